"""The super-resolution inferers: slice conditioning, samplers, seeds, K-sample uncertainty, the SR denoiser."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.diffusion.edm import SRDenoiser
from common.inferers.edm_slice import EDMSliceInferer
from common.inferers.utils import AutocastInferer, sample_mean_std
from common.networks import AdaGNUNet
from common.transforms.intensity import to_signed, to_unit
from common.transforms.io import SplitMeanStdd
from common.transforms.slices import slice_stack
from common.transforms.upsample import GridUpsample


class CondDenoiser(nn.Module):
    """D(x; σ) = the target LR slice (the last conditioning channel): the inferer then returns bicubic."""

    def forward(self, x, sigma, cond):
        return cond[:, -1:].clone()


class NoisyDenoiser(nn.Module):
    """D depends on the state x, so the result depends on the noise (and the seed). Records its inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, sigma, cond):
        self.calls.append((x.shape[0], sigma.clone(), cond.clone()))
        return 0.1 * x + cond[:, -1:]


def _lr(shape=(5, 6, 7), seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_cond_denoiser_gives_bicubic():
    lr = _lr()
    out = EDMSliceInferer(slice_batch=2, progress=False)(lr[None, None], CondDenoiser())
    assert out.shape == (1, 1, 5, 12, 14)
    expected = GridUpsample((1, 2, 2), "cubic")(lr[None, None]).clamp(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, calls_per_batch",
    [
        ({"sampler": "paper"}, 1),
        ({"sampler": "euler", "num_steps": 4}, 4),
        ({"sampler": "heun", "num_steps": 3}, 5),  # 2 evaluations per step, one on the last step to σ = 0
        ({"sampler": "heun", "num_steps": 3, "init_sigma_scale": True}, 5),
        ({"sampler": "heun", "num_steps": 4, "max_correction_gain": 1.0}, 4),  # every correction's gain > 1
        ({"sampler": "heun", "num_steps": 20, "max_correction_gain": 1.0}, 39),  # every gain <= 1: Heun as is
    ],
)
def test_samplers_shape_and_calls(kwargs, calls_per_batch):
    net = NoisyDenoiser()
    out = EDMSliceInferer(slice_batch=2, progress=False, **kwargs)(_lr()[None, None], net)
    assert out.shape == (1, 1, 5, 12, 14)
    assert out.min() >= 0 and out.max() <= 1
    assert len(net.calls) == 3 * calls_per_batch  # 5 slices in batches of 2
    assert [c[0] for c in net.calls[:calls_per_batch]] == [2] * calls_per_batch


def test_paper_sampler_evaluates_at_sigma_max():
    net = NoisyDenoiser()
    EDMSliceInferer(sigma_max=5.0, slice_batch=8, progress=False)(_lr()[None, None], net)
    assert len(net.calls) == 1
    torch.testing.assert_close(net.calls[0][1], torch.full((5,), 5.0))


@pytest.mark.parametrize("sampler", ["paper", "euler"])
def test_deterministic_per_seed(sampler):
    lr = _lr()[None, None]

    def run(seed):
        inferer = EDMSliceInferer(sampler=sampler, num_steps=2, s_churn=1.0, seed=seed, progress=False)
        return inferer(lr, NoisyDenoiser())

    a, b, c = run(0), run(0), run(1)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize(
    "offsets, slice_index, expected_sources",
    [
        ((-1, 0), 0, (0, 0)),  # the first slice repeats itself as its previous neighbour
        ((-1, 0), 3, (2, 3)),
        ((-1, 0, 1), 4, (3, 4, 4)),  # the last slice repeats itself as its next neighbour
        ((-1, 0, 1), 0, (0, 0, 1)),
    ],
)
def test_condition_uses_neighbours(offsets, slice_index, expected_sources):
    lr = _lr()
    cond = EDMSliceInferer(offsets=offsets, progress=False).condition(lr)
    up = GridUpsample((1, 2, 2), "cubic")(lr[None, None])[0, 0]
    assert cond.shape == (5, len(offsets), 12, 14)
    for channel, source in enumerate(expected_sources):
        torch.testing.assert_close(cond[slice_index, channel], to_signed(up[source]))


def test_denoiser_sees_each_slice_condition():
    lr = _lr()
    net = NoisyDenoiser()
    inferer = EDMSliceInferer(slice_batch=2, progress=False)
    inferer(lr[None, None], net)
    seen = torch.cat([c[2] for c in net.calls])
    torch.testing.assert_close(seen, inferer.condition(lr))


@pytest.mark.parametrize("num_samples", [2, 4])
def test_k_samples_mean_and_std(num_samples):
    lr = _lr()[None, None]
    out = EDMSliceInferer(num_samples=num_samples, progress=False)(lr, NoisyDenoiser())
    assert out.shape == (1, 2, 5, 12, 14)
    assert out[:, 1].min() >= 0 and out[:, 1].max() > 0
    constant = EDMSliceInferer(num_samples=num_samples, progress=False)(lr, CondDenoiser())
    torch.testing.assert_close(constant[:, 1], torch.zeros_like(constant[:, 1]))


def test_sample_mean_std_matches_torch():
    samples = torch.randn(5, 1, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    out = sample_mean_std(lambda k: samples[k], 5)
    torch.testing.assert_close(out[:, 0:1], samples.mean(0))
    torch.testing.assert_close(out[:, 1:2], samples.std(0))
    torch.testing.assert_close(sample_mean_std(lambda k: samples[k], 1), samples[0])
    with pytest.raises(ValueError):
        sample_mean_std(lambda k: samples[k], 0)


def test_split_mean_std():
    two = {"pred": torch.stack([torch.zeros(3, 3, 3), torch.ones(3, 3, 3)])}
    out = SplitMeanStdd("pred")(two)
    assert out["pred"].shape == (1, 3, 3, 3) and out["pred"].max() == 0 and out["pred_std"].min() == 1
    one = SplitMeanStdd("pred")({"pred": torch.zeros(1, 3, 3, 3)})
    assert "pred_std" not in one


@pytest.mark.parametrize("scale_factor, sampler", [((2, 2, 2), "paper"), ((1, 2, 2), "nope")])
def test_bad_settings(scale_factor, sampler):
    with pytest.raises(ValueError):
        EDMSliceInferer(scale_factor=scale_factor, sampler=sampler)


def _tiny_denoiser(num_cond=2):
    torch.manual_seed(0)
    model = AdaGNUNet(2, num_cond + 1, 1, channels=(8, 16), cond_channels=16, num_res_blocks=1)
    nn.init.normal_(model.conv_out.weight, std=0.1)  # not the zero init, so F is not identically 0
    return SRDenoiser(model, num_cond=num_cond, probe_sigma=5.0).eval()


def test_sr_denoiser_three_calls():
    net = _tiny_denoiser()
    x = torch.randn(2, 3, 16, 16)
    cond, noisy = x[:, :2], x[:, 2:]
    with torch.no_grad():
        d_single = net(x)
        d = net(noisy, 5.0, cond)
        f = net(noisy, torch.full((2,), 5.0), cond, raw=True)
        c_skip, c_out, _, _ = net.get_scalings(torch.tensor(5.0))
    torch.testing.assert_close(d_single, d)
    torch.testing.assert_close(d, c_skip * noisy + c_out * f)
    with pytest.raises(ValueError):
        net(noisy)


def test_sr_denoiser_in_the_inferer_with_amp():
    net = _tiny_denoiser()
    lr = _lr((3, 8, 8))[None, None]
    with torch.no_grad():
        out32 = EDMSliceInferer(progress=False)(lr, net)
        out16 = EDMSliceInferer(progress=False, amp=True, channels_last=True)(lr, net)
    assert out16.dtype == torch.float32 and out16.shape == (1, 1, 3, 16, 16)
    assert (out32 - out16).abs().max() < 0.05


def test_autocast_inferer():
    net = _tiny_denoiser()
    x = torch.randn(2, 1, 16, 16)
    cond = torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        ref = net(x, sigma=torch.ones(2), cond=cond, raw=True)
        out = AutocastInferer(enabled=True, channels_last=True)(x, net, sigma=torch.ones(2), cond=cond, raw=True)
        plain = AutocastInferer(enabled=False)(x, net, sigma=torch.ones(2), cond=cond, raw=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(plain, ref)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


def test_unit_signed_round_trip():
    x = torch.rand(10)
    torch.testing.assert_close(to_unit(to_signed(x)), x)
    assert to_unit(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]


def test_slice_stack_agrees_with_condition():
    lr = _lr()
    up = GridUpsample((1, 2, 2), "cubic")(lr[None, None])[0, 0]
    torch.testing.assert_close(EDMSliceInferer(progress=False).condition(lr), to_signed(slice_stack(up, (-1, 0))))


def test_channels_last_weights_gives_the_layout_back():
    """A validator sharing the trainer's network must not leave it channels-last (training floats depend on it)."""
    from common.inferers.utils import channels_last_weights

    net = torch.nn.Conv2d(2, 4, 3)
    with channels_last_weights(net) as inner:
        assert inner.weight.is_contiguous(memory_format=torch.channels_last)
    assert net.weight.is_contiguous() and not net.weight.is_contiguous(memory_format=torch.channels_last)
    net.to(memory_format=torch.channels_last)
    with channels_last_weights(net):
        pass
    assert net.weight.is_contiguous(memory_format=torch.channels_last)  # it was channels-last: left so


def test_bounded_heun_at_four_steps_is_euler():
    """``max_correction_gain`` 1 on the 4-step grid (gains 2.5, 4.95, 19): the collapsing corrections become Euler
    steps, so the result is the 4-step Euler sampler's, bit for bit."""
    lr = _lr()[None, None]
    heun = EDMSliceInferer(sampler="heun", num_steps=4, max_correction_gain=1.0, seed=3, progress=False)
    euler = EDMSliceInferer(sampler="euler", num_steps=4, seed=3, progress=False)
    torch.testing.assert_close(heun(lr, NoisyDenoiser()), euler(lr, NoisyDenoiser()), atol=0, rtol=0)
    plain = EDMSliceInferer(sampler="heun", num_steps=4, seed=3, progress=False)(lr, NoisyDenoiser())
    assert not torch.equal(plain, euler(lr, NoisyDenoiser()))
