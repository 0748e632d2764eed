"""Tests of common.inferers.cascade: x2 then x2 lands on a direct x4's grid (shape and sample positions), one network
per stage, K whole chains for mean and std."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.inferers.cascade import CascadeInferer
from common.inferers.ddpm_volume import DDPMSRInferer
from common.inferers.edm_volume import EDMVolumeInferer
from test_ddpm_volume import OracleEps, Pointwise


def stage(scale, **kw) -> DDPMSRInferer:
    kw = {"roi_size": (4, 8, 8), "num_steps": 3, "progress": False, **kw}
    return DDPMSRInferer(scale, **kw)


def ramp(shape=(3, 6, 6)):
    """LR volume linear along both in-plane axes: value 0.2 + 0.05·(i + j)."""
    i = torch.arange(shape[1], dtype=torch.float32).reshape(1, -1, 1)
    j = torch.arange(shape[2], dtype=torch.float32).reshape(1, 1, -1)
    return (0.2 + 0.05 * (i + j)).expand(*shape).reshape(1, 1, *shape).contiguous()


def test_x2_then_x2_has_the_shape_and_grid_of_a_direct_x4():
    lr = ramp()
    cascade = CascadeInferer([stage((1, 2, 2)), stage((1, 2, 2))])
    assert cascade.scale_factor == (1, 4, 4)
    out = cascade(lr, nn.ModuleList([OracleEps(), OracleEps()]))
    direct = stage((1, 4, 4))(lr, OracleEps())
    assert out.shape == direct.shape == (1, 1, 3, 24, 24)
    # geometry: with oracle stages the output is the interpolated ramp; x4 HR voxel m sits at LR coordinate
    # (m + 0.5)/4 − 0.5 for the cascade as for the direct model (a half-voxel slip would move the ramp by 0.025)
    m = torch.arange(24, dtype=torch.float32)
    pos = (m + 0.5) / 4 - 0.5
    expected = 0.2 + 0.05 * (pos.reshape(-1, 1) + pos.reshape(1, -1))
    inner = slice(8, 16)  # away from the replicate-padded borders of both cubic stages
    for result in (out, direct):
        torch.testing.assert_close(result[0, 0, 1, inner, inner], expected[inner, inner], atol=2e-4, rtol=0)


def test_through_plane_chain_and_mixed_stage_types():
    lr = torch.rand(1, 1, 4, 4, 2)
    edm = EDMVolumeInferer((1, 1, 2), roi_size=-1, num_steps=2, progress=False)
    cascade = CascadeInferer([edm, stage((1, 1, 2), roi_size=-1)])
    assert cascade.scale_factor == (1, 1, 4)

    def denoiser(x, sigma, cond):
        return cond[:, :1]

    assert cascade(lr, [denoiser, Pointwise()]).shape == (1, 1, 4, 4, 8)


def test_each_stage_gets_its_own_network():
    first, second = OracleEps(), OracleEps()
    stages = [stage((1, 2, 2)), stage((1, 2, 2))]
    cascade = CascadeInferer(stages)
    cascade(torch.rand(1, 1, 2, 4, 4), [first, second])
    # stage 1 samples the x2 grid (2, 8, 8) in one window; stage 2 takes that as its LR and samples x4 in 9 windows
    assert {shape[2:] for shape, _ in first.calls} == {(2, 8, 8)} and len(first.calls) == 3
    assert len(first.calls) == stages[0].num_network_calls((2, 4, 4))
    assert {shape[2:] for shape, _ in second.calls} == {(2, 8, 8)}
    assert len(second.calls) == stages[1].num_network_calls((2, 8, 8)) == 2 * 3  # ⌈9 / 8⌉ calls per step
    with pytest.raises(ValueError, match="2 stages but got 1 networks"):
        cascade(torch.rand(1, 1, 2, 4, 4), [first])
    with pytest.raises(ValueError, match="at least one stage"):
        CascadeInferer([])


def test_k_whole_chains_give_mean_and_std():
    lr = torch.rand(1, 1, 2, 3, 3)
    kw = dict(roi_size=-1, sampler="ddpm", num_train_timesteps=8, seed=2)
    stages = [stage((1, 2, 2), **kw), stage((1, 2, 2), **kw)]
    nets = [Pointwise(), Pointwise()]
    out = CascadeInferer(stages, num_samples=3)(lr, nets)
    assert out.shape == (1, 2, 2, 12, 12) and out[:, 1].mean() > 1e-3
    chains = []
    for k in range(3):  # chain k: every stage seeded seed + k
        chain = [stage((1, 2, 2), **{**kw, "seed": 2 + k}) for _ in range(2)]
        chains.append(CascadeInferer(chain)(lr, nets))
    chains = torch.stack(chains)
    torch.testing.assert_close(out[:, :1], chains.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 1:], chains.std(0), atol=1e-6, rtol=0)
    assert all(s.seed == 2 and s.num_samples == 1 for s in stages)  # the configured stages are left as they were
    # K = 1 with a first stage of its own K > 1: its mean goes on, one channel comes out
    mixed = CascadeInferer([stage((1, 2, 2), num_samples=2, **kw), stage((1, 2, 2), **kw)])
    assert mixed(lr, nets).shape == (1, 1, 2, 12, 12)
