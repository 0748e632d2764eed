"""Sampler distillation for the stock trainer (common.engines.distillation)."""

from __future__ import annotations

import copy

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from torch import nn

from common.diffusion.edm import SRDenoiser
from common.diffusion.samplers import sample_euler, sample_heun
from common.engines.distillation import (
    SamplerDistillationPrepareBatch,
    UnrolledSampler,
    check_student_sampler,
    frozen_denoiser,
    karras_grid,
)
from common.networks import AdaGNUNet


def _denoiser(seed=0):
    torch.manual_seed(seed)
    model = AdaGNUNet(2, 2, 1, channels=(8, 16), cond_channels=16, num_res_blocks=1)
    nn.init.normal_(model.conv_out.weight, std=0.1)
    return SRDenoiser(model, num_cond=1)


def _batch(b=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(b, 1, size, size, generator=g), "label": torch.rand(b, 1, size, size, generator=g)}


def test_karras_grid_is_the_samplers_grid():
    grid = karras_grid(3, 0.0774, 5.0)
    assert len(grid) == 4 and grid[0] == pytest.approx(5.0) and grid[2] == pytest.approx(0.0774) and grid[3] == 0.0
    assert karras_grid(2, 0.1, 5.0) == pytest.approx([5.0, 0.1, 0.0])


@pytest.mark.parametrize("sampler, reference", [("euler", sample_euler), ("heun", sample_heun)])
def test_unrolled_sampler_is_the_sampler_with_gradients(sampler, reference):
    net = _denoiser()
    grid = karras_grid(2, 0.1, 5.0)
    z, cond = torch.randn(2, 1, 16, 16), torch.rand(2, 1, 16, 16) * 2 - 1
    out = UnrolledSampler(net, grid, sampler)(z, cond=cond)
    with torch.no_grad():
        torch.testing.assert_close(out, reference(net, z, grid, cond))
    out.square().mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("grid", [[5.0, 0.1], [5.0, 0.1, 0.1, 0.0], [0.1, 5.0, 0.0], [0.0]])
def test_unrolled_sampler_refuses_a_bad_grid(grid):
    with pytest.raises(ValueError, match="sigmas"):
        UnrolledSampler(_denoiser(), grid)


def test_unrolled_sampler_refuses_an_unknown_sampler():
    with pytest.raises(ValueError, match="sampler"):
        UnrolledSampler(_denoiser(), [5.0, 0.0], "dpm")


@pytest.mark.parametrize("init_sigma_scale", [False, True])
def test_prepare_batch_targets_are_the_teachers_sample(init_sigma_scale):
    teacher = _denoiser().eval().requires_grad_(False)
    before = copy.deepcopy(teacher.state_dict())
    grid = karras_grid(3, 0.0774, 5.0)
    batch = _batch()
    prepare = SamplerDistillationPrepareBatch(teacher, grid, image_key="image", label_key="label",
                                              init_sigma_scale=init_sigma_scale,
                                              generator=torch.Generator().manual_seed(3))
    z, target, args, kwargs = prepare(batch)
    expected_z = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * (5.0 if init_sigma_scale
                                                                                          else 1.0)
    torch.testing.assert_close(z, expected_z)
    torch.testing.assert_close(kwargs["cond"], batch["image"] * 2 - 1)
    assert args == () and not target.requires_grad
    torch.testing.assert_close(target, sample_euler(teacher, z, grid, kwargs["cond"]))
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_frozen_denoiser_loads_the_weights_and_takes_no_gradients(tmp_path):
    source = _denoiser(seed=1)
    torch.save(source.state_dict(), tmp_path / "teacher.pt")
    teacher = frozen_denoiser(_denoiser(seed=2), str(tmp_path / "teacher.pt"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for key, value in source.state_dict().items():
        torch.testing.assert_close(teacher.state_dict()[key], value)


def test_stock_trainer_brings_the_student_towards_the_teacher():
    """Three teacher steps distilled into one student step on a fixed batch: the trainer's loss, the student's
    distance to the teacher's sample, falls."""
    teacher = _denoiser().eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    batch = _batch(b=4, seed=1)
    prepare = SamplerDistillationPrepareBatch(teacher, karras_grid(3, 0.0774, 5.0), image_key="image",
                                              label_key="label", generator=torch.Generator().manual_seed(0))
    losses = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=[batch] * 30,
        network=UnrolledSampler(student, karras_grid(1, 5.0, 5.0)),
        optimizer=torch.optim.Adam(student.parameters(), lr=1e-3), loss_function=nn.MSELoss(),
        prepare_batch=prepare, decollate=False,
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    trainer.run()
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


@pytest.mark.parametrize("student, sampler, refused", [
    (True, "paper", False), ("true", "heun", True), (True, "euler", True), ("false", "heun", False),
    (False, "euler", False),
])
def test_check_student_sampler(student, sampler, refused):
    if refused:
        with pytest.raises(ValueError, match="--student false"):
            check_student_sampler(student, sampler)
    else:
        check_student_sampler(student, sampler)
