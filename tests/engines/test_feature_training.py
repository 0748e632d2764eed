"""Tests of common.engines.feature_training: the corruptions of the autoencoder task, the slice patch sampler, and
the command, which trains a few steps on a tiny NIfTI folder and writes a loadable encoder state_dict."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from common.engines.feature_training import FeatureAutoencoder, SlicePatchSampler, corrupt, main
from common.losses.perceptual import BrainFeatureEncoder
from phantoms import head_phantom


def _phantom(shape=(20, 40, 36), seed=0) -> np.ndarray:
    return head_phantom(shape, seed)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Four phantoms and a splits.json: two training, one excluded training, one validation."""
    root = tmp_path_factory.mktemp("feature_data")
    for k in range(4):
        nib.save(nib.Nifti1Image(_phantom(seed=k), np.eye(4)), str(root / f"vol{k}.nii.gz"))
    split = {"training": [{"label": f"vol{k}.nii.gz"} for k in range(3)], "validation": [{"label": "vol3.nii.gz"}]}
    (root / "splits.json").write_text(json.dumps(split))
    return root


def _edge_energy(x: torch.Tensor) -> float:
    return float((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean())


def test_corrupt_blurs_both_and_holes_input_only():
    clean = (torch.rand(6, 1, 32, 32) > 0.5).float()  # all edges
    x, target = corrupt(clean, torch.Generator().manual_seed(0), p_blur=1.0, p_mask=1.0, max_noise=0.0)
    assert _edge_energy(target) < _edge_energy(clean)  # sharpness varied in the target itself
    holes = x == 0
    assert bool(holes.flatten(1).any(1).all())  # every sample has holes
    assert torch.equal(x[~holes], target[~holes])  # no noise: outside the holes the input is the target


def test_corrupt_identity_and_seeded():
    clean = torch.rand(4, 1, 24, 24)
    x, target = corrupt(clean, torch.Generator().manual_seed(0), max_noise=0.0, p_blur=0.0, p_mask=0.0)
    assert torch.equal(x, clean) and torch.equal(target, clean)
    a = corrupt(clean, torch.Generator().manual_seed(3))
    b = corrupt(clean, torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_autoencoder_rebuilds_the_input_shape():
    model = FeatureAutoencoder(channels=(8, 16, 16))
    assert model(torch.rand(2, 1, 32, 24)).shape == (2, 1, 32, 24)


@pytest.mark.parametrize("axes", [(0,), (0, 1, 2)])
def test_sampler_patches(folder, axes):
    items = [{"label": str(folder / "vol0.nii.gz")}, {"label": str(folder / "vol1.nii.gz")}]
    sampler = SlicePatchSampler(items, patch_size=16, axes=axes, seed=0)
    assert len(sampler.views) == 2 * len(axes)
    batch = sampler(5)
    assert batch.shape == (5, 1, 16, 16)
    assert float(batch.min()) >= 0 and float(batch.max()) <= 1
    assert float(batch.mean()) > 0.1  # crops centred on the head, not air
    again = SlicePatchSampler(items, patch_size=16, axes=axes, seed=0)(5)
    assert torch.equal(batch, again)


def test_command_trains_and_writes_encoder(folder, tmp_path, capsys):
    out = tmp_path / "models" / "feature_net.pt"
    summary = main(["--data", str(folder), "--datalist", str(folder / "splits.json"), "--out", str(out),
                    "--steps", "3", "--minutes", "5", "--patch_size", "16", "--batch_size", "2", "--seed", "0",
                    "--exclude", "vol2.nii.gz"])
    assert summary["steps"] == 3 and summary["volumes"] == ["vol0.nii.gz", "vol1.nii.gz"]  # no excluded/validation
    assert sorted(p.name for p in out.parent.iterdir()) == ["feature_net.pt"]  # atomic: no temporary file left
    enc = BrainFeatureEncoder()
    enc.load_state_dict(torch.load(out, weights_only=True))  # strict: the encoder alone
    torch.manual_seed(0)
    init = BrainFeatureEncoder()  # the command's initial weights (same seed): 3 Adam steps moved them
    assert any(not torch.equal(a, b) for a, b in zip(enc.state_dict().values(), init.state_dict().values()))
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].startswith("step 1 loss") and json.loads(printed[-1])["steps"] == 3
