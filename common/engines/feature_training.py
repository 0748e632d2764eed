"""Training of the brain-MRI feature encoder of the perceptual loss (:class:`common.losses.BrainFeatureEncoder`),
the offline stand-in for the thesis's RadImageNet ResNet-50 features (methods.md §4):

    python -m common.engines.feature_training --data <folder of HR NIfTI> --datalist <splits.json> \\
        --out <weights .pt> --minutes 12 --seed 0 [--exclude dev02_rorden_chris_t1.nii.gz]

Task: a masked, denoising autoencoder on 2D slice patches (96 x 96, slices along all three axes, random flips and
transposes) of the HR training volumes (only the datalist's "training" items). A light decoder without skip
connections rebuilds the patch from the encoder's last, 1/4-resolution stage, so every stage must carry the
slice's edges and tissue layout; holes (random rectangles set to air) make it use context, as inpainting does.

Why this target: the encoder's features are to tell a sharp SR slice from a blurred one. A plain denoising
target (clean slice from a blurred, noisy input) would teach the features to be *invariant* to blur, the very
degradation the loss must see. So the sharpness variation (a random anisotropic Gaussian blur, σ up to 2 voxels,
standing in for lower resolutions) is applied to input and target alike: the features must encode how sharp the
slice is to rebuild it. Noise (σ up to 0.05 of the [0, 1] range) and the holes are applied to the input only, so
the features learn to look past noise (the L1 term keeps the intensities; the perceptual term should reward
structure, not the noise pattern of one scan). The loss is L1, which keeps edges sharper than MSE.

The saved file is the ENCODER's state_dict alone (written atomically: a temporary file in the same folder, then
``os.replace``); the decoder is thrown away. Runs on CPU with bf16 autocast and channels_last, seeded; the
``--minutes`` budget counts the training loop (loading the volumes comes first and is not counted).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.networks.layers.factories import Conv, Norm
from torch import Tensor, nn

from common.data.datalists import training_datalist
from common.data.io import atomic_path
from common.losses.perceptual import BrainFeatureEncoder
from common.transforms.pipelines import hr_preprocessing
from common.transforms.slices import ForegroundSlicesd, RandSliceCropd
from common.utils import plain_tensor

__all__ = ["FeatureAutoencoder", "SlicePatchSampler", "corrupt", "train_feature_encoder"]


class FeatureAutoencoder(nn.Module):
    """:class:`BrainFeatureEncoder` with a light decoder (conv-GN-SiLU and nearest upsampling) from its last stage
    back to a 1-channel slice; no skip connections, so every encoder stage is trained.

    Args:
        channels: the encoder's stage channels.
        norm_groups: GroupNorm groups.
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 128), norm_groups: int = 8) -> None:
        super().__init__()
        self.encoder = BrainFeatureEncoder(2, 1, channels, norm_groups)
        conv, norm = Conv[Conv.CONV, 2], Norm[Norm.GROUP]
        rev = [int(c) for c in channels][::-1]
        layers: list[nn.Module] = []
        for k, c_in in enumerate(rev):
            c_out = rev[min(k + 1, len(rev) - 1)]
            layers += [conv(c_in, c_out, 3, padding=1), norm(min(norm_groups, c_out), c_out), nn.SiLU()]
            if k < len(rev) - 1:  # back up to the full resolution, one stage at a time
                layers.append(nn.Upsample(scale_factor=2.0, mode="nearest"))
        layers.append(conv(rev[-1], 1, 1))
        self.decoder = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """The rebuilt slice (B, 1, H, W), H and W multiples of 2^(stages-1)."""
        return self.decoder(self.encoder(x)[-1])


class SlicePatchSampler:
    """Random 2D patches of HR volumes on the [0, 1] scale, from non-empty slices along the chosen ``axes``.

    Each volume goes through :func:`common.transforms.hr_preprocessing` once (RAS, percentile scaling); per axis a
    view with that axis first and its non-empty slices is kept, and :class:`common.transforms.RandSliceCropd`
    draws the crops. Each patch then gets a random flip/transpose (slices along three axes come in three
    orientations).

    Args:
        items: datalist items with an HR ``label`` path.
        patch_size: square patch size.
        axes: volume axes slices are drawn along (0 = sagittal in RAS).
        seed: seed of the draws.
    """

    def __init__(self, items: Sequence[dict], patch_size: int = 96, axes: Sequence[int] = (0, 1, 2),
                 seed: int = 0) -> None:
        if not items:
            raise ValueError("no training volumes")
        load, self.views = hr_preprocessing(), []
        for item in items:
            vol = plain_tensor(load(dict(item))["label"]).float()  # (1, X, Y, Z)
            for a in axes:
                view = {"label": vol.movedim(1 + int(a), 1)}
                view["fg_slices"] = ForegroundSlicesd()(view)["fg_slices"]
                self.views.append(view)
        self.crop = RandSliceCropd((patch_size, patch_size))
        self.crop.set_random_state(seed)
        self.rng = np.random.RandomState(seed)

    def __call__(self, batch_size: int) -> Tensor:
        """A batch (batch_size, 1, p, p) of patches."""
        out = []
        for k in self.rng.randint(len(self.views), size=batch_size):
            patch = self.crop(self.views[int(k)])["label"]
            if self.rng.rand() < 0.5:
                patch = patch.flip(-1)
            if self.rng.rand() < 0.5:
                patch = patch.flip(-2)
            if self.rng.rand() < 0.5:
                patch = patch.transpose(-1, -2)
            out.append(patch)
        return torch.stack(out).contiguous()


def _gaussian_blur(x: Tensor, sigma: Tensor, dim: int) -> Tensor:
    """Per-sample Gaussian blur of ``x`` (B, 1, H, W) along ``dim`` (-1 or -2) with ``sigma`` (B,) voxels (0 = none),
    reflect-padded; a grouped conv over the batch."""
    radius = max(int(math.ceil(3 * float(sigma.max()))), 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # σ -> 0: a delta
    b = x.shape[0]
    y = x.transpose(0, 1)  # (1, B, H, W): the batch as channels
    if dim == -1:
        y = nn.functional.pad(y, (radius, radius, 0, 0), mode="reflect")
        y = nn.functional.conv2d(y, kernel[:, None, None, :], groups=b)
    else:
        y = nn.functional.pad(y, (0, 0, radius, radius), mode="reflect")
        y = nn.functional.conv2d(y, kernel[:, None, :, None], groups=b)
    return y.transpose(0, 1)


def corrupt(clean: Tensor, generator: torch.Generator, max_blur: float = 2.0, max_noise: float = 0.05,
            p_blur: float = 0.5, p_mask: float = 0.5) -> tuple[Tensor, Tensor]:
    """(input, target) of the autoencoder from clean patches (B, 1, H, W) on [0, 1].

    Target: with probability ``p_blur`` an anisotropic Gaussian blur (σ per axis ~ U(0, max_blur)), else the
    patch. Input: the target plus Gaussian noise (σ ~ U(0, max_noise)) and, with probability ``p_mask``, 1-4
    rectangles of 8 to H/3 voxels set to 0 (air).

    Args:
        clean: patches (B, 1, H, W).
        generator: seeded CPU generator of all draws.
        max_blur: largest blur σ in voxels.
        max_noise: largest noise σ on the [0, 1] scale.
        p_blur: probability of blurring a patch.
        p_mask: probability of holes in a patch.
    """
    b, _, h, w = clean.shape

    def u(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator)

    blurred = u(b) < p_blur
    target = clean
    for dim in (-2, -1):
        sigma = torch.where(blurred, u(b) * max_blur, torch.zeros(b))
        if bool((sigma > 0).any()):
            target = _gaussian_blur(target, sigma, dim)
    noisy = target + (u(b) * max_noise)[:, None, None, None] * torch.randn(clean.shape, generator=generator)
    keep = torch.ones_like(clean)
    for i in torch.nonzero(u(b) < p_mask)[:, 0].tolist():
        for _ in range(int(torch.randint(1, 5, (1,), generator=generator))):
            rh, rw = (int(torch.randint(8, max(s // 3, 9), (1,), generator=generator)) for s in (h, w))
            y0, x0 = int(torch.randint(0, h - rh + 1, (1,), generator=generator)), \
                int(torch.randint(0, w - rw + 1, (1,), generator=generator))
            keep[i, :, y0 : y0 + rh, x0 : x0 + rw] = 0
    return noisy * keep, target


def train_feature_encoder(
    items: Sequence[dict], out: str | Path, minutes: float = 12.0, steps: int | None = None, seed: int = 0,
    batch_size: int = 16, patch_size: int = 96, lr: float = 1e-3, axes: Sequence[int] = (0, 1, 2),
    bf16: bool = True, log_every: int = 10, save_every_s: float = 120.0,
) -> dict:
    """Train :class:`FeatureAutoencoder` for ``minutes`` (or ``steps``, whichever ends first) and save the encoder's
    state_dict to ``out``; returns a summary (steps, seconds, first/last losses).

    Args:
        items: datalist items with an HR ``label`` path (the training split only).
        out: encoder weights file (.pt), written atomically, also every ``save_every_s`` seconds.
        minutes: wall budget of the training loop.
        steps: largest number of steps (None: the time budget alone).
        seed: seed of weights, draws and corruptions.
        batch_size: patches per step.
        patch_size: square patch size (a multiple of 4).
        lr: Adam's learning rate, cosine-decayed to 5 % over the budget.
        axes: volume axes slices are drawn along.
        bf16: bf16 autocast on CPU.
        log_every: print every this many steps.
        save_every_s: seconds between intermediate saves.
    """
    torch.manual_seed(seed)
    t_load = time.perf_counter()
    sampler = SlicePatchSampler(items, patch_size, axes, seed)
    print(f"loaded {len(items)} volumes ({len(sampler.views)} slice views) in {time.perf_counter() - t_load:.1f} s",
          flush=True)
    model = FeatureAutoencoder().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    budget_s = 60.0 * float(minutes)
    t0 = last_save = time.perf_counter()
    losses: list[float] = []
    step = 0

    def save() -> None:
        with atomic_path(out) as tmp:
            torch.save(model.encoder.state_dict(), str(tmp))

    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s or (steps is not None and step >= steps):
            break
        progress = step / steps if steps else elapsed / budget_s
        for group in opt.param_groups:
            group["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        x, target = corrupt(sampler(batch_size), gen)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            recon = model(x)
        loss = nn.functional.l1_loss(recon.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % log_every == 0 or step == 1:
            now = time.perf_counter() - t0
            print(f"step {step} loss {np.mean(losses[-log_every:]):.5f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"time {now:.0f} s ({now / step:.2f} s/step)", flush=True)
        if time.perf_counter() - last_save > save_every_s:
            save()
            last_save = time.perf_counter()
    save()
    window = max(min(50, len(losses) // 5), 1)
    summary = {
        "out": str(out), "steps": step, "train_seconds": round(time.perf_counter() - t0, 1),
        "first_loss": round(float(np.mean(losses[:window])), 5) if losses else None,
        "final_loss": round(float(np.mean(losses[-window:])), 5) if losses else None,
        "loss_window": window, "volumes": [Path(it["label"]).name for it in items], "seed": seed,
    }
    print(json.dumps(summary), flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m common.engines.feature_training``: train the brain feature encoder and save its weights."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="folder of HR NIfTI volumes")
    ap.add_argument("--datalist", default=None, help="MONAI-style JSON whose 'training' items are used")
    ap.add_argument("--out", required=True, help="encoder state_dict file (.pt)")
    ap.add_argument("--minutes", type=float, default=12.0, help="wall budget of the training loop")
    ap.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exclude", nargs="*", default=[], help="file names to leave out (e.g. non-commercial licences)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--patch_size", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--axes", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the machine's cores are shared with other trainings
    items = [it for it in training_datalist(args.data, args.datalist)["training"]
             if Path(it["label"]).name not in set(args.exclude)]
    return train_feature_encoder(items, args.out, args.minutes, args.steps, args.seed, args.batch_size,
                                 args.patch_size, args.lr, args.axes, not args.fp32)


if __name__ == "__main__":
    main()
