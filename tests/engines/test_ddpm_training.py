"""DDPM training batches for the stock trainer (common.engines.ddpm): the seed's ε-prediction loss through MONAI's
``SupervisedTrainer`` with :class:`common.inferers.ConcatDiffusionInferer`."""

from __future__ import annotations

import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from common.diffusion.ddpm import ddpm_scheduler
from common.engines.ddpm import DDPMPrepareBatch
from common.inferers.ddpm_volume import ConcatDiffusionInferer


def _batch(b=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image_up": torch.rand(b, 1, size, size, size, generator=g),
            "label": torch.rand(b, 1, size, size, size, generator=g)}


def _unet():
    torch.manual_seed(0)
    return DiffusionModelUNet(spatial_dims=3, in_channels=2, out_channels=1, channels=(8, 8), num_res_blocks=1,
                              attention_levels=(False, False), norm_num_groups=4, num_head_channels=8)


@pytest.mark.parametrize("signed", [True, False])
def test_prepare_batch_gives_hr_noise_and_signed_condition(signed):
    batch = _batch()
    x0, target, args, kwargs = DDPMPrepareBatch(1000, signed=signed, generator=torch.Generator().manual_seed(3))(batch)
    scale = (lambda x: x * 2 - 1) if signed else (lambda x: x)
    torch.testing.assert_close(x0, scale(batch["label"]))
    torch.testing.assert_close(kwargs["condition"], scale(batch["image_up"]))
    assert args == () and target is kwargs["noise"] and target.shape == x0.shape
    t = kwargs["timesteps"]
    assert t.dtype == torch.long and t.shape == (3,) and 0 <= int(t.min()) and int(t.max()) < 1000
    again = DDPMPrepareBatch(1000, signed=signed, generator=torch.Generator().manual_seed(3))(batch)
    torch.testing.assert_close(again[1], target)  # one generator: reproducible draws
    assert torch.equal(again[3]["timesteps"], t)


def test_timesteps_cover_the_schedule():
    prep = DDPMPrepareBatch(10, generator=torch.Generator().manual_seed(0))
    t = prep.get_timesteps(torch.zeros(2000, 1, 1, 1, 1))
    assert set(t.tolist()) == set(range(10))


def test_max_timestep_truncates_the_draws():
    """A CCDF-start model trains only t ≤ max_timestep (every value of {0, …, max} drawn, none above)."""
    prep = DDPMPrepareBatch(1000, max_timestep=7, generator=torch.Generator().manual_seed(0))
    assert set(prep.get_timesteps(torch.zeros(2000, 1, 1, 1, 1)).tolist()) == set(range(8))
    assert DDPMPrepareBatch(1000).max_timestep == 999  # default: the whole chain


@pytest.mark.parametrize("max_timestep", [-1, 1000])
def test_max_timestep_out_of_range_is_refused(max_timestep):
    with pytest.raises(ValueError, match="max_timestep"):
        DDPMPrepareBatch(1000, max_timestep=max_timestep)


def test_trainer_loss_is_the_seed_epsilon_mse():
    """One SupervisedTrainer step: its loss is MSE(ε̂(cat[√ᾱ_t x0 + √(1−ᾱ_t) ε, cond], t), ε) (Ho et al. eq. 14)."""
    net, batch, scheduler = _unet(), _batch(b=2), ddpm_scheduler(1000, max_beta=0.3)
    prep = DDPMPrepareBatch(1000, generator=torch.Generator().manual_seed(5))
    x0, noise, _, kwargs = DDPMPrepareBatch(1000, generator=torch.Generator().manual_seed(5))(batch)
    a = scheduler.alphas_cumprod[kwargs["timesteps"]].reshape(-1, 1, 1, 1, 1)
    with torch.no_grad():
        expected = nn.functional.mse_loss(
            net(torch.cat([a.sqrt() * x0 + (1 - a).sqrt() * noise, kwargs["condition"]], 1), kwargs["timesteps"]),
            noise)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=[batch], network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.0), loss_function=nn.MSELoss(), prepare_batch=prep,
        inferer=ConcatDiffusionInferer(scheduler),
    )
    trainer.run()
    assert trainer.state.output[0]["loss"] == pytest.approx(float(expected), rel=1e-4)
