"""Tests of common.losses.perceptual: the brain feature encoder, the LPIPS-style slice distance (zero for identical
slices, growing with blur, gradients to the input only, float32 under bf16 autocast), the L1 + perceptual loss, and
the clear errors for a missing weights file and for RadImageNet weights that cannot be had offline."""

import urllib.error

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.layers import GaussianFilter

from common.losses.perceptual import BrainFeatureEncoder, L1PerceptualLoss, SlicePerceptualLoss, lpips_distance
from conftest import REPO

TRAINED = REPO / "bundles" / "brain_mri_attention_unet_super_resolution" / "models" / "feature_net.pt"


def _synthetic(size: int = 64) -> torch.Tensor:
    """A head-like slice on [0, 1]: an ellipse with a brighter inner ellipse, stripes and a dark hole (sharp edges)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    img = 0.6 * ((x / 0.85) ** 2 + (y / 0.7) ** 2 < 1).float()
    img += 0.3 * ((x / 0.5) ** 2 + (y / 0.4) ** 2 < 1).float() * (torch.sin(12 * x) > 0).float()
    img[(x - 0.2) ** 2 + (y + 0.1) ** 2 < 0.02] = 0.1
    return img[None, None]


@pytest.fixture(scope="module")
def real_slice(mri_dir) -> torch.Tensor:
    """A 64 x 64 crop of a sagittal slice of a real scan, scaled to [0, 1] by its 1st/99th percentiles."""
    img = nib.load(str(mri_dir / "dev03_mr_gd_skullstripped_ce_t1.nii.gz"))
    plane = np.asarray(img.dataobj[88], dtype=np.float32)[70:134, 40:104]
    lo, hi = np.percentile(plane, [1, 99])
    return torch.from_numpy(np.clip((plane - lo) / (hi - lo), 0, 1))[None, None]


@pytest.fixture
def image(request):
    return _synthetic() if request.param == "synthetic" else request.getfixturevalue("real_slice")


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A state_dict file of a randomly initialised encoder (the trained one may be absent)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "encoder.pt"
    torch.save(BrainFeatureEncoder().state_dict(), path)
    return path


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return GaussianFilter(2, sigma)(x)


@pytest.mark.parametrize(
    "kwargs, shape", [({}, (2, 1, 32, 32)), ({"channels": (8, 16)}, (1, 1, 20, 12)), ({"channels": (4,)}, (3, 1, 7, 9))]
)
def test_encoder_stage_shapes(kwargs, shape):
    enc = BrainFeatureEncoder(**kwargs)
    feats = enc(torch.rand(shape))
    channels = kwargs.get("channels", (32, 64, 128))
    assert [f.shape[1] for f in feats] == list(channels)
    h, w = shape[2:]
    for s, f in enumerate(feats):  # stride 2 between stages (padding 1: ceil)
        assert f.shape[2:] == (-(-h // 2**s), -(-w // 2**s))


def test_encoder_torchscript():
    torch.manual_seed(0)
    enc = BrainFeatureEncoder(channels=(8, 16)).eval()
    x = torch.rand(2, 1, 16, 16)
    scripted = torch.jit.script(enc)
    for a, b in zip(scripted(x), enc(x)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("image", ["synthetic", "real"], indirect=True)
def test_zero_for_identical_and_monotone_in_blur(random_weights, image):
    loss = SlicePerceptualLoss(weights_path=random_weights, signed=False)
    assert float(loss(image, image.clone())) < 1e-6
    d = [float(loss(blur(image, s), image)) for s in (0.5, 1.0, 2.0)]
    assert 0 < d[0] < d[1] < d[2] <= 4.0, d


@pytest.mark.parametrize("image", ["synthetic", "real"], indirect=True)
def test_trained_weights_monotone_in_blur(image):
    if not TRAINED.is_file():
        pytest.skip(f"trained weights not found at {TRAINED}")
    enc = BrainFeatureEncoder()
    enc.load_state_dict(torch.load(TRAINED, weights_only=True))  # strict: the file is an encoder state_dict
    loss = SlicePerceptualLoss(weights_path=TRAINED, signed=False)
    assert float(loss(image, image.clone())) < 1e-6
    d = [float(loss(blur(image, s), image)) for s in (0.5, 1.0, 2.0)]
    assert 0 < d[0] < d[1] < d[2], d


def test_signed_maps_back_to_unit_range(random_weights):
    x, y = _synthetic(32), blur(_synthetic(32), 1.0)
    unsigned = SlicePerceptualLoss(weights_path=random_weights, signed=False)(x, y)
    signed = SlicePerceptualLoss(weights_path=random_weights, signed=True)(2 * x - 1, 2 * y - 1)
    torch.testing.assert_close(signed, unsigned)


def test_gradient_reaches_input_not_encoder(random_weights):
    loss = SlicePerceptualLoss(weights_path=random_weights)
    loss.train()  # a trainer may switch modules to training: the features stay frozen in eval mode
    assert not loss.net.training
    pred = (2 * blur(_synthetic(32), 1.5) - 1).requires_grad_(True)
    loss(pred, 2 * _synthetic(32) - 1).backward()
    assert pred.grad is not None and float(pred.grad.abs().sum()) > 0
    assert all(not p.requires_grad and p.grad is None for p in loss.net.parameters())


def test_float32_under_bf16_autocast(random_weights):
    loss = SlicePerceptualLoss(weights_path=random_weights)
    x, y = 2 * blur(_synthetic(32), 1.0) - 1, 2 * _synthetic(32) - 1
    ref = loss(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(x.bfloat16(), y.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=1e-4)  # only the bf16 rounding of the inputs differs


def test_channels_are_slices(random_weights):
    """(B, C, H, W) stacks: each channel is one slice; reduction 'none' gives (B, C)."""
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    per = SlicePerceptualLoss(weights_path=random_weights, reduction="none")(x, y)
    assert per.shape == (2, 3)
    single = SlicePerceptualLoss(weights_path=random_weights, reduction="none")(x[:, 1:2], y[:, 1:2])
    torch.testing.assert_close(per[:, 1:2], single)


def test_lpips_distance_range():
    """Unit vectors: opposite features give 4, equal ones 0, per stage; stages are averaged."""
    f = torch.randn(2, 5, 3, 3)
    d = lpips_distance([f, f], [-f, f])
    torch.testing.assert_close(d, torch.full((2,), 2.0))


@pytest.mark.parametrize("weight", [0.0, 2e-3, 5e-3])
def test_l1_perceptual(random_weights, weight):
    x, y = 2 * blur(_synthetic(32), 1.0) - 1, 2 * _synthetic(32) - 1
    l1 = torch.nn.functional.l1_loss(x, y)
    if weight == 0:  # no feature network at all, so no weights file is needed
        loss = L1PerceptualLoss(0.0, weights_path="/nonexistent/feature_net.pt")
        assert loss.perceptual is None and not list(loss.parameters())
        torch.testing.assert_close(loss(x, y), l1)
    else:
        loss = L1PerceptualLoss(weight, weights_path=random_weights)
        perceptual = SlicePerceptualLoss(weights_path=random_weights)(x, y)
        assert float(perceptual) > 0
        torch.testing.assert_close(loss(x, y), l1 + weight * perceptual)


@pytest.mark.parametrize("cls", [SlicePerceptualLoss, L1PerceptualLoss])
def test_missing_weights_names_path_and_command(tmp_path, cls):
    missing = tmp_path / "models" / "feature_net.pt"
    with pytest.raises(FileNotFoundError, match="feature_net.pt") as info:
        cls(weights_path=missing)
    assert str(missing) in str(info.value) and "common.engines.feature_training" in str(info.value)


def test_wrong_arguments(random_weights):
    with pytest.raises(ValueError, match="feature_network"):
        SlicePerceptualLoss("alex", weights_path=random_weights)
    with pytest.raises(ValueError, match="shape"):
        SlicePerceptualLoss(weights_path=random_weights)(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 9))


def test_radimagenet_offline_error(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(RuntimeError, match="RadImageNet ResNet-50 weights are downloaded from the hub") as info:
        SlicePerceptualLoss("radimagenet_resnet50")
    message = str(info.value)
    assert "not available offline" in message and torch.hub.get_dir() in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_radimagenet_path_is_monai(monkeypatch):
    """With weights in the hub cache (here: a stand-in network returned by torch.hub.load), the thesis's path runs
    MONAI's PerceptualLoss: 1-channel slices repeated to 3 by MONAI, gradients to the input, zero for identity."""
    calls = []

    def cached(repo, model, **kwargs):
        calls.append((repo, model))
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))

    monkeypatch.setattr(torch.hub, "load", cached)
    loss = SlicePerceptualLoss("radimagenet_resnet50")
    assert calls == [("Project-MONAI/perceptual-models:main", "radimagenet_resnet50")]
    x = (2 * _synthetic(32) - 1).requires_grad_(True)
    assert float(loss(x, x.detach())) < 1e-6
    d = loss(2 * blur(_synthetic(32), 1.0) - 1, x.detach()) + loss(x, 2 * blur(_synthetic(32), 2.0) - 1)
    d.backward()
    assert float(d) > 0 and float(x.grad.abs().sum()) > 0
    assert all(not p.requires_grad for p in loss.net.parameters())
