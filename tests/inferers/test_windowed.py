"""Tests of common.inferers.windowed: exactness for pointwise denoisers, no seams, bounded window batches."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.diffusion.edm import EDMPrecond
from common.diffusion.samplers import get_sigmas_karras, make_noise, sample_euler, sample_heun
from common.inferers.windowed import WindowedDenoiser, window_slices
from common.networks.adagn_unet import AdaGNUNet

MU, S = -0.3, 0.4  # data ~ N(MU + 0.5·cond, S²) per voxel


def posterior_mean(x, sigma, cond=None):
    """Exact D(x; σ) for a per-voxel Gaussian prior whose mean depends on cond: pointwise in x and cond."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    mu = MU if cond is None else MU + 0.5 * cond[:, :1]
    return (S**2 * x + s**2 * mu) / (S**2 + s**2)


class Recording:
    """A denoiser wrapper that records the (x, sigma, cond) shapes and the first cond voxel of every call."""

    def __init__(self, fn=posterior_mean):
        self.fn, self.x_shapes, self.sigmas, self.corners = fn, [], [], []

    def __call__(self, x, sigma, cond=None):
        self.x_shapes.append(tuple(x.shape))
        self.sigmas.append(sigma.clone())
        if cond is not None:
            self.corners.append(cond[:, :, 0, 0, 0].clone())
        return self.fn(x, sigma, cond)


def coordinate_grid(shape):
    """(1, 3, *shape) voxel indices: a cond whose first voxel tells where a window starts."""
    return torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))[None]


# ---------------------------------------------------------------------------------------------------- windows


def test_window_slices_are_the_windows_monai_visits():
    shape = (10, 12, 9)
    grid = coordinate_grid(shape).expand(2, -1, -1, -1, -1)
    rec = Recording(lambda x, s, c: x)
    wd = WindowedDenoiser(rec, roi_size=(6, 8, 16), sw_batch_size=3, overlap=0.5)
    wd(torch.zeros(2, 1, *shape), 1.0, grid)
    expected = window_slices(shape, (6, 8, 16), 0.5)
    assert wd.num_windows(shape) == len(expected) == 3 * 2 * 1  # starts (0,3,4) x (0,4) x (0,): axis 3 clipped
    seen = sorted({tuple(int(v) for v in row) for c in rec.corners for row in c})
    assert seen == sorted(tuple(s.start for s in w) for w in expected)
    assert sum(s[0] for s in rec.x_shapes) == 2 * len(expected)  # every window of both samples, once
    assert all(s[2:] == (6, 8, 9) for s in rec.x_shapes)  # the window clipped to the 9-voxel axis, no padding


@pytest.mark.parametrize("sw_batch_size", [1, 3, 5])
def test_network_batch_is_bounded_by_sw_batch_size(sw_batch_size):
    rec = Recording()
    x = torch.randn(2, 1, 12, 12, 12)
    wd = WindowedDenoiser(rec, roi_size=6, sw_batch_size=sw_batch_size, overlap=0.5)
    wd(x, 0.7, torch.randn_like(x))
    n_win = 2 * wd.num_windows((12, 12, 12))
    assert n_win == 2 * 27
    assert max(s[0] for s in rec.x_shapes) == min(sw_batch_size, n_win)
    assert all(s[1:] == (1, 6, 6, 6) for s in rec.x_shapes)
    assert len(rec.x_shapes) == -(-n_win // sw_batch_size)


def test_volume_within_one_window_calls_the_denoiser_directly():
    rec = Recording()
    x, cond = torch.randn(2, 1, 6, 5, 6), torch.randn(2, 1, 6, 5, 6)
    out = WindowedDenoiser(rec, roi_size=(6, 8, 8))(x, 0.3, cond)
    assert rec.x_shapes == [(2, 1, 6, 5, 6)]
    torch.testing.assert_close(out, posterior_mean(x, torch.full((2,), 0.3), cond))


# --------------------------------------------------------------------------------- pointwise denoiser: exact

SIGMAS = {
    "float": lambda b: 0.8,
    "0-d": lambda b: torch.tensor(0.8),
    "(1,)": lambda b: torch.tensor([0.8]),
    "(B,)": lambda b: torch.linspace(0.3, 2.0, b),
}


@pytest.mark.parametrize("kind", list(SIGMAS))
@pytest.mark.parametrize("with_cond", [True, False])
def test_pointwise_denoiser_is_reproduced_exactly(kind, with_cond):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 11, 13, 10, generator=g)
    cond = torch.randn(3, 1, 11, 13, 10, generator=g) if with_cond else None
    sigma = SIGMAS[kind](3)
    rec = Recording()
    out = WindowedDenoiser(rec, roi_size=(6, 6, 6), sw_batch_size=4, overlap=0.5)(x, sigma, cond)
    ref = posterior_mean(x, torch.as_tensor(sigma).reshape(-1).expand(3), cond)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert all(s.shape == (n[0],) for s, n in zip(rec.sigmas, rec.x_shapes))  # one σ per window


def test_per_sample_sigma_follows_each_window_to_its_sample():
    # windows of different samples share a network batch: each must carry its own sample's σ
    x = torch.zeros(3, 1, 8, 8, 8)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    out = WindowedDenoiser(lambda x, s, c: x + s.reshape(-1, 1, 1, 1, 1), roi_size=4, sw_batch_size=5)(x, sigma)
    torch.testing.assert_close(out, sigma.reshape(-1, 1, 1, 1, 1).expand_as(x).contiguous())


@pytest.mark.parametrize("sampler", [sample_euler, sample_heun])
def test_sampling_through_windows_equals_unwindowed_for_pointwise_denoiser(sampler):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 1, 10, 12, 11, generator=g)
    cond = torch.randn(2, 1, 10, 12, 11, generator=g)
    sigmas = get_sigmas_karras(6, 2e-3, 5.0)
    kw = dict(s_churn=2.0, s_noise=0.9)  # churn draws noise: both runs get the same stream
    wd = WindowedDenoiser(posterior_mean, roi_size=(6, 6, 6), sw_batch_size=8, overlap=0.5)
    out_w = sampler(wd, z, sigmas, cond, noise=make_noise(torch.Generator().manual_seed(2)), **kw)
    out_u = sampler(posterior_mean, z, sigmas, cond, noise=make_noise(torch.Generator().manual_seed(2)), **kw)
    torch.testing.assert_close(out_w, out_u, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(12, 5, 12), (12, 2, 12)])  # reflect, and the fallback to replicate
def test_pad_to_roi_keeps_window_size_and_crops_back(shape):
    rec = Recording()
    x, cond = torch.randn(1, 1, *shape), torch.randn(1, 1, *shape)
    wd = WindowedDenoiser(rec, roi_size=8, pad_to_roi=True, overlap=0.5)
    out = wd(x, 0.5, cond)
    assert all(s[2:] == (8, 8, 8) for s in rec.x_shapes)
    assert wd._padding_mode(shape, (8, 8, 8)) == ("reflect" if shape[1] == 5 else "replicate")
    torch.testing.assert_close(out, posterior_mean(x, torch.tensor([0.5]), cond), atol=1e-6, rtol=0)


def test_rejects_sigma_of_wrong_length():
    with pytest.raises(ValueError, match="sigma"):
        WindowedDenoiser(posterior_mean, 4)(torch.zeros(2, 1, 8, 8, 8), torch.ones(3))


# ------------------------------------------------------------------------------------------ seams


class RandomSmoothingNet(nn.Module):
    """A 3-layer 3D conv net with random positive weights (each filter sums to 1) and tanh: a denoiser with a
    receptive field of 7³ that, like a real one, maps noise to a spatially smooth, noise-dependent image."""

    def __init__(self, in_channels: int = 2, width: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList(
            [nn.Conv3d(in_channels, width, 3, padding=1), nn.Conv3d(width, width, 3, padding=1),
             nn.Conv3d(width, 1, 3, padding=1)]
        )
        with torch.no_grad():
            for conv in self.convs:
                w = torch.rand(conv.weight.shape, generator=g)
                conv.weight.copy_(w / w.sum(dim=(1, 2, 3, 4), keepdim=True))
                conv.bias.zero_()

    def forward(self, x, sigma, cond):
        h = torch.cat([cond, x], 1)
        for i, conv in enumerate(self.convs):
            h = conv(h)
            h = torch.tanh(h) if i < len(self.convs) - 1 else h
        return h


def per_window_uniform_baseline(denoiser, shape, roi, overlap, sigmas, cond, seed):
    """The source study's scheme: each window sampled on its own (own noise, full trajectory), then averaged
    uniformly over the windows that cover a voxel. All windows go through the sampler as one batch."""
    slices = window_slices(shape[2:], roi, overlap)
    out = torch.zeros(shape)
    count = torch.zeros(shape)
    for b in range(shape[0]):
        g = torch.Generator().manual_seed(seed + b)
        z = torch.randn(len(slices), 1, *[s.stop - s.start for s in slices[0]], generator=g)
        c = torch.cat([cond[(slice(b, b + 1), slice(None), *s)] for s in slices])
        y = sample_euler(denoiser, z, sigmas, c)
        for i, s in enumerate(slices):
            out[(slice(b, b + 1), slice(None), *s)] += y[i : i + 1]
            count[(slice(b, b + 1), slice(None), *s)] += 1
    return out / count


def border_interior_ratio(y, slices):
    """Mean |y[i+1] − y[i]| over neighbour pairs that straddle a window edge, over the mean for the other pairs
    (all axes, all samples). 1 means no step at window edges."""
    border, interior = [], []
    for ax in range(3):
        n = y.shape[2 + ax]
        edges = {s[ax].start for s in slices} | {s[ax].stop for s in slices}
        straddle = torch.tensor([(i + 1) in edges for i in range(n - 1)])
        d = y.diff(dim=2 + ax).abs().movedim(2 + ax, -1)
        border.append(d[..., straddle].flatten())
        interior.append(d[..., ~straddle].flatten())
    return (torch.cat(border).mean() / torch.cat(interior).mean()).item()


@torch.no_grad()
def test_no_seams_with_windowed_denoiser_unlike_per_window_sampling():
    shape, roi, overlap = (4, 1, 24, 24, 24), 8, 0.5  # 5 windows per axis, edges every 4 voxels
    g = torch.Generator().manual_seed(3)
    cond = F.avg_pool3d(torch.randn(shape, generator=g), 5, 1, 2)  # a smooth "upsampled LR"
    z = torch.randn(shape, generator=g)
    sigmas = get_sigmas_karras(8, 2e-3, 5.0)
    net = RandomSmoothingNet()
    slices = window_slices(shape[2:], roi, overlap)

    full = sample_euler(net, z, sigmas, cond)  # the whole volume at once: no windows, the reference
    windowed = sample_euler(WindowedDenoiser(net, roi, sw_batch_size=16, overlap=overlap), z, sigmas, cond)
    baseline = per_window_uniform_baseline(net, shape, roi, overlap, sigmas, cond, seed=100)

    uniform = sample_euler(WindowedDenoiser(net, roi, 16, overlap, mode="constant"), z, sigmas, cond)

    r_full, r_win, r_base, r_unif = (border_interior_ratio(y, slices) for y in (full, windowed, baseline, uniform))
    assert r_win < 1.15 and abs(r_win - r_full) < 0.1, (r_full, r_win, r_base)
    assert r_base > 1.4 and r_base > r_win + 0.3, (r_full, r_win, r_base)  # the paper's seams, detected
    # one trajectory is not enough: uniform blending gives the windows' edges (where the network sees its own
    # zero padding) full weight, and steps appear there too
    assert r_unif > r_win + 0.3, (r_win, r_unif)
    # and the windowed trajectory stays near the whole-volume one (it differs only through the network's zero
    # padding at window edges, which the Gaussian weights play down); independent windows stray further
    err_win, err_base = ((y - full).abs().mean().item() for y in (windowed, baseline))
    assert err_win < 0.5 * err_base, (err_win, err_base)


# ------------------------------------------------------------------- a real network: AdaGN U-Net, bf16


@torch.no_grad()
def test_tiny_adagn_unet_under_edm_precond_windowed_and_bf16():
    torch.manual_seed(0)
    unet = AdaGNUNet(
        spatial_dims=3, in_channels=2, out_channels=1, channels=(8, 16), cond_channels=16, num_res_blocks=1,
        attention_levels=(False, True), mid_attention=False, gn_group_size=8,
    )
    for p in unet.parameters():  # undo the zero inits so the output depends on the input
        if p.abs().sum() == 0 and p.ndim > 1:
            p.normal_(0, 0.1)
    precond = EDMPrecond(unet).eval()
    x = torch.randn(2, 1, 12, 12, 12)
    cond = torch.randn(2, 1, 12, 12, 12)
    wd = WindowedDenoiser(precond, roi_size=8, sw_batch_size=4, overlap=0.5)
    assert any(p is q for p in wd.parameters() for q in unet.parameters())  # a submodule: .to/.eval pass through
    out = wd(x, torch.tensor([0.5, 2.0]), cond)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    wd_bf16 = WindowedDenoiser(precond, roi_size=8, sw_batch_size=4, overlap=0.5, autocast_bf16=True)
    out_bf16 = wd_bf16(x, torch.tensor([0.5, 2.0]), cond)
    assert out_bf16.dtype == torch.float32
    assert (out_bf16 - out).abs().mean() < 3e-2 * out.abs().mean()  # ~1 % here


@torch.no_grad()
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("amp", [False, True])
def test_channels_last_windows_reach_the_network_and_change_only_rounding(spatial_dims, amp):
    """The fast path hands the network channels-last windows; its result equals the contiguous path's within float
    rounding (fp32: 1e-5 relative; bf16: 1 % of the mean magnitude, the bf16 rounding of either path)."""
    torch.manual_seed(0)
    unet = AdaGNUNet(
        spatial_dims=spatial_dims, in_channels=2, out_channels=1, channels=(8, 16), cond_channels=16,
        num_res_blocks=1, attention_levels=(False, False), mid_attention=False, gn_group_size=8,
    )
    for p in unet.parameters():
        if p.abs().sum() == 0 and p.ndim > 1:
            p.normal_(0, 0.1)
    precond = EDMPrecond(unet).eval()
    layouts = []
    hook = unet.register_forward_pre_hook(lambda m, args: layouts.append(
        args[0].is_contiguous(memory_format=torch.channels_last_3d if spatial_dims == 3 else torch.channels_last)))
    shape = (2, 1) + (12,) * spatial_dims
    x, cond = torch.randn(shape), torch.randn(shape)
    sigma = torch.tensor([0.5, 2.0])
    kw = dict(roi_size=8, sw_batch_size=4, overlap=0.5, autocast_bf16=amp)
    ref = WindowedDenoiser(precond, **kw)(x, sigma, cond)
    assert layouts and not any(layouts)
    layouts.clear()
    fast = WindowedDenoiser(precond, channels_last=True, **kw)(x, sigma, cond)
    hook.remove()
    assert layouts and all(layouts)
    assert fast.shape == ref.shape and fast.dtype == torch.float32
    if amp:
        assert (fast - ref).abs().mean() < 1e-2 * ref.abs().mean()
    else:
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
