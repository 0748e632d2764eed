"""Tests of the 3D EDM pieces: common.inferers.edm_volume (whole-volume sampling with a windowed denoiser),
common.transforms.patches (paired 3D patches) and the configs of bundles/brain_mri_edm3d_super_resolution."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from torch import nn

from common.diffusion.edm import SRDenoiser
from common.diffusion.samplers import get_sigmas_karras, make_noise, sample_euler, sample_heun
from common.inferers.edm_volume import EDMVolumeInferer, hr_window
from common.inferers.windowed import window_slices
from common.networks.adagn_unet import AdaGNUNet
from common.transforms.degrade import BlockAverage
from common.transforms.patches import RandForegroundPairedPatchd
from common.transforms.upsample import GridUpsample
from conftest import REPO

BUNDLE = REPO / "bundles" / "brain_mri_edm3d_super_resolution"
MU, S = -0.3, 0.4  # data ~ N(MU + 0.5·cond, S²) per voxel


def posterior_mean(x, sigma, cond=None):
    """Exact D(x; σ) of a per-voxel Gaussian prior whose mean follows cond: pointwise, so windows cannot matter."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    mu = MU if cond is None else MU + 0.5 * cond[:, :1]
    return (S**2 * x + s**2 * mu) / (S**2 + s**2)


class Recording:
    """A denoiser that records the shape of every call, then answers with ``fn``."""

    def __init__(self, fn=posterior_mean):
        self.fn, self.shapes = fn, []

    def __call__(self, x, sigma, cond=None):
        self.shapes.append(tuple(x.shape))
        return self.fn(x, sigma, cond)


class SmoothingBackbone(nn.Module):
    """F(x_in, c_noise) of three 3³ convolutions with random positive weights (each filter sums to 1), zero
    padding and tanh: a backbone whose output is smooth and changes near its input's borders, as a real U-Net's."""

    def __init__(self, width: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList(
            [nn.Conv3d(2, width, 3, padding=1), nn.Conv3d(width, width, 3, padding=1),
             nn.Conv3d(width, 1, 3, padding=1)]
        )
        with torch.no_grad():
            for conv in self.convs:
                w = torch.rand(conv.weight.shape, generator=g)
                conv.weight.copy_(w / w.sum(dim=(1, 2, 3, 4), keepdim=True))
                conv.bias.zero_()

    def forward(self, x, c_noise):
        h = x
        for i, conv in enumerate(self.convs):
            h = conv(h)
            h = torch.tanh(h) if i < len(self.convs) - 1 else h
        return h


def smooth_lr(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    lr = F.avg_pool3d(torch.rand(1, 1, *shape, generator=g), 5, 1, 2)
    return (lr - lr.min()) / (lr.max() - lr.min())


def tiny_unet(**kw) -> AdaGNUNet:
    torch.manual_seed(0)
    unet = AdaGNUNet(spatial_dims=3, in_channels=2, out_channels=1, channels=(8, 16), cond_channels=16,
                     num_res_blocks=1, attention_levels=(False, False), mid_attention=True, gn_group_size=8, **kw)
    with torch.no_grad():
        for p in unet.parameters():  # undo the zero inits so the output depends on the input
            if p.ndim > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.1)
    return unet.eval()


# ------------------------------------------------------------------------------------------- geometry, seeds


@pytest.mark.parametrize("scale", [(1, 2, 2), (1, 1, 4), (2, 2, 2)])
def test_output_geometry_and_range(scale):
    lr = torch.rand(2, 1, 6, 7, 5)
    inferer = EDMVolumeInferer(scale, roi_size=hr_window((4, 4, 4), scale), num_steps=3, progress=False)
    out = inferer(lr, posterior_mean)
    assert out.shape == (2, 1, 6 * scale[0], 7 * scale[1], 5 * scale[2])
    assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1
    assert inferer.condition(lr[:1]).shape == (1, 1) + tuple(out.shape[2:])


def test_conditioning_is_grid_aligned_trilinear_in_signed_range():
    lr = torch.rand(1, 1, 5, 6, 7)
    inferer = EDMVolumeInferer((1, 2, 2))
    torch.testing.assert_close(inferer.condition(lr), GridUpsample((1, 2, 2), "linear")(lr) * 2 - 1)
    # grid alignment (methods.md §0): HR voxel j sits at LR coordinate (j + 0.5)/2 − 0.5, so a ramp stays a ramp
    ramp = torch.arange(6.0).reshape(1, 1, 1, 6, 1).expand(1, 1, 3, 6, 4) / 10
    up = (inferer.condition(ramp) + 1) / 2
    j = torch.arange(12.0)
    torch.testing.assert_close(up[0, 0, 1, 1:-1, 3], ((j + 0.5) / 2 - 0.5)[1:-1] / 10, atol=1e-6, rtol=0)


def test_deterministic_per_seed_and_independent_of_batch_position():
    lr = torch.rand(2, 1, 6, 6, 6)
    net = SRDenoiser(SmoothingBackbone(), num_cond=1).eval()
    kw = dict(roi_size=(4, 8, 8), num_steps=3, s_churn=1.0, progress=False)
    a, b = EDMVolumeInferer(seed=3, **kw)(lr, net), EDMVolumeInferer(seed=3, **kw)(lr, net)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (EDMVolumeInferer(seed=4, **kw)(lr, net) - a).abs().max() > 1e-4
    torch.testing.assert_close(EDMVolumeInferer(seed=3, **kw)(lr[1:], net), a[1:], atol=0, rtol=0)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="sampler"):
        EDMVolumeInferer(sampler="ddim")
    with pytest.raises(ValueError, match="num_steps"):
        EDMVolumeInferer(num_steps=0)
    with pytest.raises(ValueError, match="expected LR volumes"):
        EDMVolumeInferer()(torch.rand(1, 2, 4, 4, 4), posterior_mean)


# ------------------------------------------------------------- windowed path == unwindowed (analytic denoiser)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("s_churn", [0.0, 3.0])
def test_windowed_sampling_equals_unwindowed_for_pointwise_denoiser(sampler, s_churn):
    lr = torch.rand(1, 1, 10, 9, 11)
    kw = dict(sampler=sampler, num_steps=5, s_churn=s_churn, s_noise=0.9, seed=7, progress=False)
    rec = Recording()
    windowed = EDMVolumeInferer(roi_size=(4, 6, 6), sw_batch_size=5, overlap=0.25, **kw)
    out_w = windowed(lr, rec)
    assert max(s[0] for s in rec.shapes) == 5 and len(rec.shapes) > 4 * windowed.num_evaluations  # many windows
    whole = Recording()
    out_u = EDMVolumeInferer(roi_size=-1, **kw)(lr, whole)
    assert whole.shapes == [(1, 1, 10, 18, 22)] * windowed.num_evaluations  # one call per evaluation: unwindowed
    torch.testing.assert_close(out_w, out_u, atol=1e-5, rtol=0)
    # and both are the plain sampler on the whole volume with the same noise stream
    g = torch.Generator().manual_seed(7)
    noise = make_noise(g)
    cond = windowed.condition(lr)
    ref = {"euler": sample_euler, "heun": sample_heun}[sampler](
        posterior_mean, noise(cond), get_sigmas_karras(5, 2e-3, 5.0), cond, noise=noise, s_churn=s_churn, s_noise=0.9
    )
    torch.testing.assert_close(out_u, ((ref + 1) / 2).clamp(0, 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_start_from_condition_starts_at_the_conditioning_plus_sigma_max_noise(sampler):
    """SDEdit/CCDF start: x_0 = cond + σ_max·z with the generator's first draw, then the same sampler."""
    lr = torch.rand(1, 1, 4, 5, 6)
    kw = dict(roi_size=-1, sampler=sampler, num_steps=3, sigma_max=0.5, seed=4, progress=False)
    inferer = EDMVolumeInferer(start_from_condition=True, **kw)
    out = inferer(lr, posterior_mean)
    g = torch.Generator().manual_seed(4)
    noise = make_noise(g)
    cond = inferer.condition(lr)
    ref = {"euler": sample_euler, "heun": sample_heun}[sampler](
        posterior_mean, cond + 0.5 * noise(cond), get_sigmas_karras(3, 2e-3, 0.5), cond, noise=noise
    )
    torch.testing.assert_close(out, ((ref + 1) / 2).clamp(0, 1), atol=1e-6, rtol=0)
    plain = EDMVolumeInferer(**kw)(lr, posterior_mean)  # from z alone: another trajectory
    assert (out - plain).abs().max() > 1e-2


@pytest.mark.parametrize("sampler, steps, nfe", [("euler", 1, 1), ("euler", 20, 20), ("heun", 4, 7), ("heun", 1, 1)])
def test_number_of_function_evaluations(sampler, steps, nfe):
    rec = Recording()
    inferer = EDMVolumeInferer(roi_size=-1, sampler=sampler, num_steps=steps, progress=False)
    inferer(torch.rand(1, 1, 4, 4, 4), rec)
    assert inferer.num_evaluations == nfe == len(rec.shapes)


def test_network_batch_is_bounded_by_the_window_batch():
    rec = Recording()
    inferer = EDMVolumeInferer(roi_size=(4, 8, 8), sw_batch_size=3, overlap=0.25, num_steps=2, progress=False)
    inferer(torch.rand(1, 1, 12, 12, 12), rec)
    n_windows = len(window_slices((12, 24, 24), (4, 8, 8), 0.25))
    assert n_windows > 3 and max(s[0] for s in rec.shapes) == 3
    assert {s[1:] for s in rec.shapes} == {(1, 4, 8, 8)}
    assert len(rec.shapes) == 2 * -(-n_windows // 3)


# --------------------------------------------------------------------------------------------------- seams


def step_ratio(y, slices):
    """Mean |y[i+1] − y[i]| over neighbour pairs that straddle an inner window edge, over the mean for the other
    pairs (all axes). 1: no step at window borders."""
    border, interior = [], []
    for ax in range(3):
        n = y.shape[2 + ax]
        edges = ({s[ax].start for s in slices} | {s[ax].stop for s in slices}) - {0, n}
        straddle = torch.tensor([(i + 1) in edges for i in range(n - 1)])
        d = y.diff(dim=2 + ax).abs().movedim(2 + ax, -1)
        border.append(d[..., straddle].flatten())
        interior.append(d[..., ~straddle].flatten())
    return (torch.cat(border).mean() / torch.cat(interior).mean()).item()


def per_window_sampling(lr, net, lr_roi, overlap, scale, steps, seed):
    """The source study's scheme: every LR window sampled on its own (own noise, own trajectory), averaged
    uniformly where windows overlap."""
    hr_shape = [s * f for s, f in zip(lr.shape[2:], scale)]
    out, count = torch.zeros(1, 1, *hr_shape), torch.zeros(1, 1, *hr_shape)
    for k, win in enumerate(window_slices(lr.shape[2:], lr_roi, overlap)):
        hr_win = (slice(None), slice(None)) + tuple(slice(s.start * f, s.stop * f) for s, f in zip(win, scale))
        y = EDMVolumeInferer(scale, roi_size=-1, num_steps=steps, seed=seed + k, progress=False)(
            lr[(slice(None), slice(None)) + win], net
        )
        out[hr_win] += y
        count[hr_win] += 1
    return out / count


@torch.no_grad()
@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_no_step_at_window_borders(overlap):
    scale, lr_roi = (1, 2, 2), (8, 8, 8)
    lr = smooth_lr((24, 24, 24))  # 4-5 windows per axis
    net = SRDenoiser(SmoothingBackbone(), num_cond=1).eval()
    roi = hr_window(lr_roi, scale)
    inferer = EDMVolumeInferer(scale, roi_size=roi, sw_batch_size=16, overlap=overlap, num_steps=6, progress=False)
    out = inferer(lr, net)
    slices = window_slices(out.shape[2:], roi, overlap)
    assert len(slices) >= 4**3
    whole = EDMVolumeInferer(scale, roi_size=-1, num_steps=6, progress=False)(lr, net)  # no windows at all
    r_out, r_whole = step_ratio(out, slices), step_ratio(whole, slices)
    assert r_out < 1.15 and r_out - r_whole < 0.25, (r_out, r_whole)
    if overlap == 0.25:  # the check sees the seams of per-window sampling on the same windows
        base = per_window_sampling(lr, net, lr_roi, overlap, scale, 6, seed=100)
        r_base = step_ratio(base, slices)
        assert r_base > 1.3 and r_base > r_out + 0.25, (r_out, r_base)
        assert (out - whole).abs().mean() < 0.5 * (base - whole).abs().mean()


# ------------------------------------------------------------------------- samples, progress, bf16, real net


def test_num_samples_gives_mean_and_std_of_the_seeded_samples():
    lr = torch.rand(1, 1, 5, 6, 6)
    net = SRDenoiser(SmoothingBackbone(), num_cond=1).eval()
    kw = dict(roi_size=(4, 8, 8), num_steps=3, s_churn=2.0, seed=11, progress=False)
    inferer = EDMVolumeInferer(num_samples=3, **kw)
    out = inferer(lr, net)
    assert out.shape == (1, 2, 5, 12, 12)
    g = torch.Generator().manual_seed(11)
    cond = inferer.condition(lr)
    samples = torch.stack([((inferer.sample(cond, net, g) + 1) / 2).clamp(0, 1) for _ in range(3)])
    torch.testing.assert_close(out[:, :1], samples.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 1:], samples.std(0, unbiased=True), atol=1e-6, rtol=0)
    assert out[:, 1].max() > 0
    # K = 1 is the first of those samples
    torch.testing.assert_close(EDMVolumeInferer(**kw)(lr, net), samples[0], atol=1e-6, rtol=0)


def test_progress_line_per_sampler_step(capsys):
    EDMVolumeInferer(roi_size=-1, num_steps=4, num_samples=2)(torch.rand(1, 1, 4, 4, 4), posterior_mean)
    lines = [line for line in capsys.readouterr().err.splitlines() if "sampler step" in line]
    assert len(lines) == 8 and lines[0].startswith("SR sample 1/2: sampler step 1/4 (σ = 5)")
    assert lines[-1].startswith("SR sample 2/2: sampler step 4/4")


@torch.no_grad()
def test_adagn_unet_windowed_with_bf16_autocast():
    net = SRDenoiser(tiny_unet(), num_cond=1).eval()
    lr = smooth_lr((8, 8, 8))
    kw = dict(roi_size=(8, 8, 8), sw_batch_size=4, num_steps=2, progress=False)
    out = EDMVolumeInferer(**kw)(lr, net)
    out_bf16 = EDMVolumeInferer(amp=True, **kw)(lr, net)
    assert out.shape == out_bf16.shape == (1, 1, 8, 16, 16) and out_bf16.dtype == torch.float32
    assert (out_bf16 - out).abs().mean() < 2e-2


# ------------------------------------------------------------------------------------------- paired patches


def paired_item(scale, hr_shape=(12, 24, 20)):
    g = torch.Generator().manual_seed(0)
    hr = torch.zeros(1, *hr_shape)
    c = [s // 2 for s in hr_shape]
    blob = 0.5 + 0.5 * torch.rand(1, 6, 8, 8, generator=g)
    hr[:, c[0] - 3 : c[0] + 3, c[1] - 4 : c[1] + 4, c[2] - 4 : c[2] + 4] = blob
    lr = BlockAverage(scale)(hr)
    up = GridUpsample(scale, "linear")(lr[None])[0]
    return {"image": lr, "label": hr, "image_up": up, "slice_foreground": torch.rand(hr_shape[0])}


@pytest.mark.parametrize("scale", [(1, 2, 2), (1, 1, 4)])
def test_paired_patches_are_aligned(scale):
    item = paired_item(scale)
    t = RandForegroundPairedPatchd("image", ["label", "image_up"], (3, 4, 2), scale, num_samples=8, pos_fraction=0.5)
    t.set_random_state(0)
    for patch in t(item):
        assert set(patch) == {"image", "label", "image_up"}  # whole-volume extras dropped, so batches collate
        assert patch["label"].shape == patch["image_up"].shape == (1, 3 * scale[0], 4 * scale[1], 2 * scale[2])
        torch.testing.assert_close(BlockAverage(scale)(patch["label"]), patch["image"])  # HR covers the LR patch
        # the conditioning is the crop of the whole-volume upsampling (what inference windows see)
        hits = [
            start
            for start in ((a, b, c) for a in range(12 - 3 * scale[0] + 1) for b in range(0, 25 - 4 * scale[1], scale[1])
                          for c in range(0, 21 - 2 * scale[2], scale[2]))
            if torch.equal(item["label"][:, start[0] : start[0] + 3 * scale[0], start[1] : start[1] + 4 * scale[1],
                                         start[2] : start[2] + 2 * scale[2]], patch["label"])
            and torch.equal(item["image_up"][:, start[0] : start[0] + 3 * scale[0],
                                             start[1] : start[1] + 4 * scale[1], start[2] : start[2] + 2 * scale[2]],
                            patch["image_up"])
        ]
        assert hits, "patch not found at an aligned position"


def test_patches_prefer_foreground():
    item = paired_item((1, 2, 2))
    fg = []
    for pos_fraction in (0.0, 1.0):
        t = RandForegroundPairedPatchd("image", ["label", "image_up"], (2, 3, 3), (1, 2, 2), num_samples=200,
                                       pos_fraction=pos_fraction)
        t.set_random_state(1)
        fg.append(sum(float((p["label"] > 0.1).float().mean()) for p in t(item)) / 200)
    assert fg[1] > 0.5 and fg[1] > 2 * fg[0], fg


def test_patch_larger_than_volume_is_refused():
    t = RandForegroundPairedPatchd("image", ["label"], (20, 4, 4), (1, 2, 2))
    with pytest.raises(ValueError, match="smaller than the patch"):
        t(paired_item((1, 2, 2)))


# ------------------------------------------------------------------------------------------- bundle configs


def parse(*names, **overrides):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / n) for n in names])
    parser["bundle_root"] = str(BUNDLE)
    for k, v in overrides.items():
        parser[k] = v
    return parser


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def test_cpu_configuration_train_and_inference_agree():
    inf, train = parse("inference.json"), parse("train.json")
    net_i, net_t = inf.get_parsed_content("network_def"), train.get_parsed_content("network_def")
    assert {k: v.shape for k, v in net_i.state_dict().items()} == {k: v.shape for k, v in net_t.state_dict().items()}
    assert 1e6 < n_params(net_i) < 3e6
    inferer = inf.get_parsed_content("inferer")
    assert isinstance(inferer, EDMVolumeInferer)
    # the window (0.5.0): the training window (LR patch x factor, 16x32x32) times roi_scale (1, 2, 2)
    assert hr_window(train["patch_size"], train["scale_factor"]) == [16, 32, 32]
    assert list(inferer.roi_size) == [16, 64, 64] and inf["roi_scale"] == [1, 2, 2]
    # CPU default (0.6.0): the distilled student's 2 Euler steps, σ 5 and 0.1
    assert (inferer.sampler, inferer.num_steps) == ("euler", 2)
    torch.testing.assert_close(inferer.sigmas(), torch.tensor([5.0, 0.1, 0.0]), atol=0, rtol=1e-6)
    # the general weights (0.4.0-0.5.0): 3 Euler steps on the first three noise levels of the 4-step grid (0.3.1's
    # default, the same validation quality as 20), i.e. without its last evaluation at σ = 2e-3
    general = parse("inference.json", distilled=False).get_parsed_content("inferer")
    four = get_sigmas_karras(4, 2e-3, 5.0, 7.0)
    assert (general.sampler, general.num_steps) == ("euler", 3)
    torch.testing.assert_close(general.sigmas()[:3], four[:3], atol=0, rtol=1e-3)  # σ_min 0.0774 = 0.077439 rounded
    evaluation = parse("train.json", "evaluate.json").get_parsed_content("validate#inferer")
    torch.testing.assert_close(evaluation.sigmas(), inferer.sigmas(), atol=0, rtol=0)
    assert list(evaluation.roi_size) == [16, 64, 64]
    # paper.json keeps the paper's 20
    paper = parse("inference.json", "paper.json").get_parsed_content("inferer")
    torch.testing.assert_close(paper.sigmas(), get_sigmas_karras(20, 2e-3, 5.0, 7.0), atol=0, rtol=0)
    # both shipped weights files load into the configured network
    for name in ("model.pt", "model_2step.pt"):
        net_i.load_state_dict(torch.load(BUNDLE / "models" / name, map_location="cpu", weights_only=True))


def test_through_plane_scale_sets_the_window():
    inferer = parse("inference.json", scale_factor=[1, 1, 4]).get_parsed_content("inferer")
    assert list(inferer.roi_size) == [16, 32, 128] and inferer.scale_factor == (1, 1, 4)  # 16x16x64 x roi_scale


@pytest.mark.parametrize("config", ["inference.json", "train.json"])
def test_paper_configuration_has_the_papers_parameter_count(config):
    parser = parse(config, "paper.json")
    net = parser.get_parsed_content("network_def")
    assert n_params(net) == 50_713_153  # 50.71 M, the 3D study's count
    assert net.model.in_channels == 2 and list(parser.get_parsed_content("roi_size")) == [32, 64, 64]


def test_test_overrides_only_change_sizes():
    overrides = json.loads((BUNDLE / "configs" / "test_overrides.json").read_text())
    allowed = {"num_slices", "num_steps", "epochs", "iterations", "batch_size", "patch_size", "val_num_slices",
               "val_num_steps"}
    assert set(overrides["inference"]) | set(overrides["train"]) <= allowed
