"""σ_max for SRMRI training by the rule of Song & Ermon 2020 (technique 1: the largest Euclidean distance between
two training images), on the crops the model is trained on; also the data mean and standard deviation.

    python -m common.engines.sigma_max --dataset_dir <HR folder> [--datalist <json>] --patch_size 64 64
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import torch
from torch import Tensor

from common.data.datalists import training_datalist
from common.diffusion.vesde import sigma_max_rule
from common.transforms.pipelines import hr_preprocessing
from common.transforms.slices import random_slice_crops

__all__ = ["sample_crops", "estimate_sigma_max", "main"]


def sample_crops(items: Sequence[dict], patch_size: Sequence[int], num_crops: int = 1000, seed: int = 0) -> Tensor:
    """``num_crops`` training crops (N, 1, h, w) drawn as the trainer draws them, spread over the volumes.

    Args:
        items: datalist items with an HR ``label`` path.
        patch_size: in-plane crop size.
        num_crops: number of crops.
        seed: seed of the crop draw.
    """
    if not items:
        raise ValueError("no training volumes")
    load, crops = hr_preprocessing(), random_slice_crops(patch_size)
    crops.set_random_state(seed)
    out = []
    for k, item in enumerate(items):
        vol = load(dict(item))
        n = num_crops // len(items) + (1 if k < num_crops % len(items) else 0)
        out += [crops(vol)["label"] for _ in range(n)]
    return torch.stack(out)


def estimate_sigma_max(
    items: Sequence[dict], patch_size: Sequence[int], num_crops: int = 1000, seed: int = 0
) -> dict[str, float]:
    """σ_max for crops of ``patch_size`` by Song & Ermon's rule, with the crops' mean and standard deviation.

    Args:
        items: datalist items with an HR ``label`` path (the training split).
        patch_size: in-plane crop size of the training.
        num_crops: crops drawn (pairwise distances cost ``num_crops²``).
        seed: seed of the draw.
    """
    crops = sample_crops(items, patch_size, num_crops, seed)
    return {
        "sigma_max": round(sigma_max_rule(crops, max_images=None), 2),
        "data_mean": float(crops.mean()),
        "data_std": float(crops.std()),
        "num_crops": int(crops.shape[0]),
        "patch_size": [int(p) for p in patch_size],
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m common.engines.sigma_max``: print σ_max (and the data statistics) for the training crops as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset_dir", required=True, help="folder of HR NIfTI volumes")
    ap.add_argument("--datalist", default=None, help="MONAI-style JSON whose 'training' items are used")
    ap.add_argument("--patch_size", type=int, nargs=2, default=[64, 64])
    ap.add_argument("--num_crops", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    split = training_datalist(args.dataset_dir, args.datalist)
    result = estimate_sigma_max(split["training"], args.patch_size, args.num_crops, args.seed)
    result["volumes"] = [str(it["label"]) for it in split["training"]]
    print(json.dumps(result, indent=2))
    return result
