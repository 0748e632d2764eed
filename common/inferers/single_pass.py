"""Single-pass slice super-resolution as a MONAI ``Inferer``: one network call per sagittal slice, the slice
stacked with its LR neighbours, plus a per-slice context vector (covariates and slice position) for the attention
U-Net of the 3T->7T thesis (methods.md §4).

Images enter and leave in [0, 1] (the percentile scaling of methods.md §0); networks see [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from torch import Tensor

from common.data.covariates import encode_covariates
from common.inferers.edm_slice import EDMSliceInferer
from common.inferers.utils import SliceProgress, autocast_context, channels_last_weights
from common.transforms.intensity import to_unit
from common.transforms.slice_augment import slice_position
from common.transforms.upsample import GridUpsample
from common.utils import as_flag

__all__ = ["SliceContextInferer"]


class SliceContextInferer(Inferer):
    """Super-resolve a volume slice by slice along axis 0 with ``network(stack, context)``, one call per slice.

    Each slice's input is the stack of its LR neighbours at ``offsets`` (edge slices repeat), upsampled in-plane on
    the HR grid (grid-aligned cubic, as training); its context is ``[age / 100, sex, group, position]``
    (:func:`common.data.encode_covariates`, NaN = unknown; position -1 first slice, 0 middle, 1 last).

    Args:
        scale_factor: HR/LR factor per axis; the first (slicing) axis must be 1.
        offsets: neighbour offsets of the input slices ((-1, 0, 1): 3 slices, the thesis; (-2, ..., 2): 5).
        covariates: the person's ``age``/``sex``/``group`` (a mapping; missing entries unknown); None: unknown.
        use_context: pass the context vector (False: ``network(stack)`` alone, for networks without one).
        slice_batch: slices per network call.
        amp: bf16 autocast (CPU or GPU).
        channels_last: run the network in channels-last memory format.
        upsample_mode: the upsampling of the LR input (see :class:`common.transforms.GridUpsample`).
        progress: print a progress line per slice batch.
    """

    def __init__(
        self,
        scale_factor: Sequence[int] = (1, 2, 2),
        offsets: Sequence[int] = (-1, 0, 1),
        covariates: Mapping[str, Any] | None = None,
        use_context: bool = True,
        slice_batch: int = 8,
        amp: bool = False,
        channels_last: bool = False,
        upsample_mode: str = "cubic",
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.scale_factor = tuple(int(f) for f in scale_factor)
        if len(self.scale_factor) != 3 or self.scale_factor[0] != 1:
            raise ValueError(f"slice super-resolution is in-plane: scale_factor must be (1, fy, fz), "
                             f"got {scale_factor}")
        self.offsets = tuple(int(o) for o in offsets)
        self.covariates = encode_covariates(covariates or {})
        self.use_context, self.slice_batch = as_flag(use_context), int(slice_batch)
        self.amp, self.channels_last, self.progress = as_flag(amp), as_flag(channels_last), as_flag(progress)
        self.upsample = GridUpsample((1,) + self.scale_factor[1:], upsample_mode)

    # the 2.5D EDM's per-slice conditioning (upsampled neighbour stack in [-1, 1]) is this network's input
    condition = EDMSliceInferer.condition

    def context(self, num_slices: int, device: torch.device | str = "cpu") -> Tensor:
        """The (num_slices, 4) context vectors of a volume's slices."""
        position = slice_position(torch.arange(num_slices, dtype=torch.float32), num_slices)
        known = torch.tensor(self.covariates, dtype=torch.float32).expand(num_slices, -1)
        return torch.cat([known, position[:, None]], dim=1).to(device)

    def _volume(self, lr: Tensor, network: Callable, label: str) -> Tensor:
        stack = self.condition(lr)
        context = self.context(stack.shape[0], stack.device)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        n = stack.shape[0]
        progress = SliceProgress(n, self.progress, label)
        out = torch.empty((n,) + tuple(stack.shape[2:]), dtype=torch.float32, device=lr.device)
        for start in range(0, n, self.slice_batch):
            x = stack[start : start + self.slice_batch].contiguous(memory_format=memory_format)
            with autocast_context(x.device, self.amp):
                args = (context[start : start + x.shape[0]],) if self.use_context else ()
                out[start : start + x.shape[0]] = network(x, *args)[:, 0].float()
            progress.batch(x.shape[0])
        return to_unit(out)

    def __call__(self, inputs: Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Tensor:
        """Super-resolve (B, 1, X, y, z) LR volumes in [0, 1] into (B, 1, X, Y, Z) in [0, 1].

        Args:
            inputs: LR volumes, channel-first, in [0, 1].
            network: ``network(stack[, context]) -> HR slices`` in [-1, 1].
            args: unused (MONAI's inferer signature).
            kwargs: unused.
        """
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else torch.as_tensor(inputs)
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected LR volumes (B, 1, X, y, z), got shape {tuple(x.shape)}")
        self.upsample.to(x.device)
        outputs = []
        with torch.no_grad(), channels_last_weights(network, self.channels_last):
            for b in range(x.shape[0]):
                label = f"volume {b + 1}/{x.shape[0]}" if x.shape[0] > 1 else "SR"
                outputs.append(self._volume(x[b, 0], network, label)[None, None])
        return torch.cat(outputs, dim=0)
