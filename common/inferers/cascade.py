"""A cascade of super-resolution stages: each stage's output is the next stage's input (methods.md §2, cascade).

:class:`CascadeInferer` chains SR inferers (e.g. two :class:`common.inferers.DDPMSRInferer` for x2 then x2 in-plane,
or 4 mm -> 2 mm -> 1 mm through-plane), each with its own network and weights. It is a MONAI ``Inferer`` whose
``network`` is the sequence of the stages' networks (a ``torch.nn.ModuleList`` in a bundle config, so an evaluator's
``network.eval()`` and ``.to(device)`` reach every stage): ``inferer(lr, networks)``.

Geometry: every stage upsamples on the half-voxel-aligned grid (HR voxel j at LR coordinate (j + 0.5)/f − 0.5), and
two such maps compose into the one of the product factor: ((m + 0.5)/f2 − 0.5 + 0.5)/f1 − 0.5 = (m + 0.5)/(f1·f2)
− 0.5. A cascade's output therefore sits on the grid (shape and affine) of a direct ``f1·f2`` model, and
:attr:`CascadeInferer.scale_factor` is the product of the stages' factors, the one the bundle's writer needs.

Samples: with ``num_samples`` K > 1 the cascade draws K whole chains (sample k of stage 1 feeds sample k of stage
2; stage seeds ``seed + k``) and returns their mean and standard deviation, so the spread includes every stage's
uncertainty. With K = 1 every stage runs as configured; a stage that returns mean and std (its own K > 1) passes its
mean on.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from torch import Tensor

from common.inferers.utils import sample_mean_std

__all__ = ["CascadeInferer"]


class CascadeInferer(Inferer):
    """Stage inferers run in order, each on the previous stage's output, each with its own network.

    Args:
        stages: the stage inferers, first (lowest resolution) first; each is ``stage(lr, network) -> sr`` on volumes
            (B, 1, *spatial) in [0, 1] (any SR inferer of ``common.inferers``).
        num_samples: K; K > 1 returns the mean and the standard deviation of K whole chains as 2 channels (the
            stages then run with one sample each and seeds ``seed + k``).
    """

    def __init__(self, stages: Sequence[Inferer], num_samples: int = 1) -> None:
        super().__init__()
        self.stages = list(stages)
        if not self.stages:
            raise ValueError("a cascade needs at least one stage")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)

    @property
    def scale_factor(self) -> tuple[int, ...]:
        """The cascade's HR/LR factor per axis: the product of the stages' ``scale_factor``."""
        factors = [tuple(int(f) for f in stage.scale_factor) for stage in self.stages]
        return tuple(math.prod(axis) for axis in zip(*factors))

    def _chain(self, x: Tensor, networks: Sequence[Callable[..., Any]], stages: Sequence[Inferer]) -> Tensor:
        for i, (stage, net) in enumerate(zip(stages, networks)):
            x = stage(x, net)
            if i < len(stages) - 1 and x.shape[1] > 1:
                x = x[:, :1]  # a stage's own K > 1: its mean goes on
        return x

    def _stages_for_sample(self, k: int) -> list[Inferer]:
        """Shallow copies of the stages with one sample each and their seed moved by ``k``."""
        out = []
        for stage in self.stages:
            s = copy.copy(stage)
            if hasattr(s, "num_samples"):
                s.num_samples = 1
            if hasattr(s, "seed"):
                s.seed = int(s.seed) + k
            out.append(s)
        return out

    @torch.no_grad()
    def __call__(self, inputs: Tensor, network: Sequence[Callable[..., Any]], *args: Any, **kwargs: Any) -> Tensor:
        """Super-resolve LR volumes (B, 1, *spatial) in [0, 1] through every stage.

        Args:
            inputs: LR volumes, channel-first, in [0, 1].
            network: one network per stage, in the stages' order (a list or ``torch.nn.ModuleList``).
            args: unused (MONAI's inferer signature).
            kwargs: unused.

        Returns:
            (B, 1, ...) for K = 1 (a stage's own K > 1 on the last stage gives its 2 channels), (B, 2, ...) for K > 1.
        """
        networks = list(network)
        if len(networks) != len(self.stages):
            raise ValueError(f"the cascade has {len(self.stages)} stages but got {len(networks)} networks")
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else torch.as_tensor(inputs)
        if self.num_samples == 1:
            return self._chain(x, networks, self.stages)
        return sample_mean_std(lambda k: self._chain(x, networks, self._stages_for_sample(k))[:, :1],
                               self.num_samples)

    def __repr__(self) -> str:
        inner = ", ".join(repr(s) for s in self.stages)
        return f"{type(self).__name__}([{inner}], num_samples={self.num_samples})"
