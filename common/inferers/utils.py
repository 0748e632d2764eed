"""What every SR inferer shares: bf16 autocast on CPU (:class:`AutocastInferer` for trainers and evaluators),
the K-sample loop with mean and standard deviation (:func:`sample_mean_std`), and slice progress lines.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer
from torch import Tensor, nn

from common.utils import as_flag

__all__ = ["autocast_context", "channels_last_weights", "AutocastInferer", "sample_mean_std", "sample_volumes",
           "SliceProgress"]


def autocast_context(device: torch.device | str, enabled: bool, dtype: torch.dtype = torch.bfloat16):
    """``torch.autocast`` for ``device`` (bf16 by default, CPU included) when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@contextlib.contextmanager
def channels_last_weights(network: Any, enabled: bool = True):
    """Run ``network`` with channels-last 4D weights, and hand them back in the layout they had.

    A validator shares the trainer's network: leaving it channels-last would change the layout the next training
    steps compute in, and with it the float results, so a resumed run would no longer match an uninterrupted one.
    """
    if not enabled or not isinstance(network, nn.Module):
        yield network
        return
    weights = [p for p in network.parameters() if p.ndim == 4]
    was_channels_last = all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    network.to(memory_format=torch.channels_last)
    try:
        yield network
    finally:
        if not was_channels_last:
            network.to(memory_format=torch.contiguous_format)


class AutocastInferer(Inferer):
    """``network(inputs, *args, **kwargs)`` under ``torch.autocast`` (bf16) on the inputs' device when enabled.

    MONAI's trainers only autocast on CUDA; this inferer gives the trainer and evaluators bf16 on CPU too.

    Args:
        enabled: use autocast.
        dtype: autocast dtype ("bfloat16" or "float16", or a torch dtype).
        channels_last: pass 4D tensors (inputs and tensor keyword arguments) in channels-last memory format.
    """

    def __init__(
        self, enabled: bool = True, dtype: str | torch.dtype = torch.bfloat16, channels_last: bool = False
    ) -> None:
        super().__init__()
        self.enabled = as_flag(enabled)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.channels_last = as_flag(channels_last)

    def __call__(self, inputs: Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.channels_last:

            def fmt(t: Any) -> Any:
                return t.contiguous(memory_format=torch.channels_last) if isinstance(t, Tensor) and t.ndim == 4 else t

            inputs, kwargs = fmt(inputs), {k: fmt(v) for k, v in kwargs.items()}
        with autocast_context(inputs.device, self.enabled, self.dtype):
            out = network(inputs, *args, **kwargs)
        return out.float() if isinstance(out, Tensor) and out.is_floating_point() else out


def sample_mean_std(sample: Callable[[int], Tensor], num_samples: int = 1, unbiased: bool = True) -> Tensor:
    """Draw ``num_samples`` outputs and return their mean, plus their standard deviation when ``num_samples > 1``.

    Streams the samples (Welford's update), so memory stays at two volumes whatever K is.

    Args:
        sample: ``sample(k)`` returns the k-th sample (B, 1, *spatial); called for k = 0 .. K-1 in order.
        num_samples: K.
        unbiased: divide by K - 1 (True) or K for the variance.

    Returns:
        (B, 1, *spatial) for K = 1, else (B, 2, *spatial): channel 0 the mean, channel 1 the standard deviation.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    mean = sample(0).float()
    if num_samples == 1:
        return mean
    m2 = torch.zeros_like(mean)
    for k in range(1, num_samples):
        x = sample(k).float()
        delta = x - mean
        mean = mean + delta / (k + 1)
        m2 = m2 + delta * (x - mean)
    var = m2 / (num_samples - 1 if unbiased else num_samples)
    return torch.cat([mean, var.clamp_min(0).sqrt()], dim=1)


def sample_volumes(
    inputs: Tensor,
    condition: Callable[[Tensor], Tensor],
    sample: Callable[[Tensor, torch.Generator, str, int], Tensor],
    num_samples: int = 1,
    seed: int = 0,
) -> Tensor:
    """The volume samplers' loop: each LR volume (B, 1, x, y, z) conditioned on its own, one generator seeded with
    ``seed`` per volume (so a volume's result does not depend on its batch neighbours), ``num_samples`` draws
    reduced by :func:`sample_mean_std`.

    Args:
        inputs: LR volumes, channel-first (a MetaTensor or tensor).
        condition: LR volume (1, 1, x, y, z) -> the sampler's conditioning.
        sample: ``sample(cond, generator, label, k)`` -> the k-th sample (1, 1, X, Y, Z) in [0, 1] of a volume,
            k = 0 .. K-1 in order, all from that volume's ``generator``; ``label`` names it in progress lines.
        num_samples: K.
        seed: the generators' seed.

    Returns:
        (B, 1, X, Y, Z) for K = 1, else (B, 2, X, Y, Z): the mean and the standard deviation.
    """
    x = inputs.as_tensor() if hasattr(inputs, "as_tensor") else torch.as_tensor(inputs)
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"expected LR volumes (B, 1, x, y, z), got shape {tuple(x.shape)}")
    outputs = []
    for b in range(x.shape[0]):
        cond = condition(x[b : b + 1])
        generator = torch.Generator(device=cond.device).manual_seed(int(seed))
        name = f"volume {b + 1}/{x.shape[0]}" if x.shape[0] > 1 else "SR"

        def one(k: int, cond: Tensor = cond, generator: torch.Generator = generator, name: str = name) -> Tensor:
            return sample(cond, generator, name if num_samples == 1 else f"{name} sample {k + 1}/{num_samples}", k)

        outputs.append(sample_mean_std(one, num_samples))
    return torch.cat(outputs, dim=0)


class SliceProgress:
    """A progress line per slice batch, and per sampler step at most every ``interval`` seconds (stderr)."""

    def __init__(self, total: int, enabled: bool, label: str, interval: float = 0.0) -> None:
        self.total, self.enabled, self.label, self.interval = total, enabled, label, interval
        self.done, self.t0 = 0, time.perf_counter()
        self.last = self.t0

    def step(self, i: int, n: int, sigma: float) -> None:
        now = time.perf_counter()
        if self.enabled and n > 1 and (i == 0 or now - self.last >= self.interval):
            self.last = now
            print(f"{self.label}: slices {self.done}/{self.total}, sampler step {i + 1}/{n} (σ = {sigma:.3g})",
                  file=sys.stderr, flush=True)

    def batch(self, count: int) -> None:
        self.done += count
        if self.enabled:
            rate = (time.perf_counter() - self.t0) / max(self.done, 1)
            print(f"{self.label}: slices {self.done}/{self.total} ({rate:.3f} s/slice)", file=sys.stderr, flush=True)
