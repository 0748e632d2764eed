"""WGAN-GP trainer (common.engines.wgan_gp): Algorithm 1's update schedule, the loss terms it reports, the frozen
critic of the generator step, the supervised limit (adv_weight 0) and a resumed run matching an uninterrupted one."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.handlers import from_engine
from torch import nn
from torch.utils.data import DataLoader

from common.engines import EngineCheckpointSaver, EpochSeeding, GradientClipping, ResumeFromLatest, latest_checkpoint
from common.engines.wgan_gp import WGANGPTrainer
from common.inferers import AutocastInferer
from common.losses import critic_score, gradient_penalty
from common.networks import patch_critic

SIZE = 24


class CondGenerator(nn.Module):
    """A conditional generator called like the bundle's U-Net: ``g(cond_stack, context)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.context = nn.Conv2d(2, 1, 3, padding=1), nn.Linear(3, 1)

    def forward(self, x, context):
        return self.conv(x) + self.context(context)[:, :, None, None]


def prepare_batch(batchdata, device=None, non_blocking=False, **kwargs):
    """(cond_stack, hr, (context,), {}) like the bundle's prepare-batch."""
    def to(t):
        return t.to(device=device, non_blocking=non_blocking, **kwargs)

    return to(batchdata["image"]), to(batchdata["label"]), (to(batchdata["context"]),), {}


def _loader(n=4, batch_size=2):
    g = torch.Generator().manual_seed(123)
    data = [
        {"image": torch.rand(2, SIZE, SIZE, generator=g), "label": torch.rand(1, SIZE, SIZE, generator=g),
         "context": torch.rand(3, generator=g)}
        for _ in range(n)
    ]
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _parts(seed=0, condition_critic=False):
    torch.manual_seed(seed)
    g = CondGenerator()
    d = patch_critic(2, 3 if condition_critic else 1, channels=4, num_layers_d=2)
    g_opt = torch.optim.Adam(g.parameters(), lr=1e-3, betas=(0.0, 0.9))
    d_opt = torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.0, 0.9))
    return g, d, g_opt, d_opt


def _trainer(parts, max_epochs, n_critic=5, handlers=(), **kwargs):
    g, d, g_opt, d_opt = parts
    return WGANGPTrainer(
        device="cpu", max_epochs=max_epochs, train_data_loader=_loader(), g_network=g, g_optimizer=g_opt,
        g_loss_function=nn.L1Loss(), d_network=d, d_optimizer=d_opt, n_critic=n_critic, prepare_batch=prepare_batch,
        train_handlers=list(handlers), **kwargs,
    )


def _snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module):
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


@pytest.mark.parametrize(
    "n_critic, iterations, options",
    [
        (5, 10, {}),
        (3, 10, {"g_inferer": AutocastInferer(enabled=True)}),  # bf16 generator on CPU
        (1, 4, {"condition_critic": True}),
        # the gradient-scaler path (scaler and CUDA autocast disable themselves, with warnings, without CUDA)
        pytest.param(2, 4, {"amp": True}, marks=pytest.mark.filterwarnings("ignore::UserWarning",
                                                                           "ignore::FutureWarning")),
    ],
)
def test_update_schedule(n_critic, iterations, options):
    """The critic steps every iteration, the generator every n_critic-th one only (and gets clipped then)."""
    parts = _parts(condition_critic=options.get("condition_critic", False))
    g, d, g_opt, d_opt = parts
    steps = {"g": 0, "d": 0, "backward": 0}
    g_opt.register_step_post_hook(lambda *a: steps.__setitem__("g", steps["g"] + 1))
    d_opt.register_step_post_hook(lambda *a: steps.__setitem__("d", steps["d"] + 1))
    trainer = _trainer(parts, iterations // 2, n_critic, [GradientClipping(max_norm=1.0)], **options)
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED,
                              lambda e: steps.__setitem__("backward", steps["backward"] + 1))
    before, log = {}, []

    @trainer.on(Events.ITERATION_STARTED)
    def _before(engine):
        before["g"], before["d"] = _snapshot(g), _snapshot(d)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _after(engine):
        log.append((engine.state.iteration, _changed(before["g"], g), _changed(before["d"], d)))

    trainer.run()
    n_g = iterations // n_critic
    assert steps == {"g": n_g, "d": iterations, "backward": n_g}
    assert [it for it, g_changed, _ in log if g_changed] == [n_critic * k for k in range(1, n_g + 1)]
    assert all(d_changed for _, _, d_changed in log)
    assert trainer.network is g and trainer.optimizer is g_opt and "grad_norm" in trainer.state.metrics
    loss = from_engine(["loss"], first=True)(trainer.state.output)  # decollated, as train.json's handlers read it
    assert math.isfinite(float(loss))


def test_reported_losses():
    """loss = g_loss = content + adv_weight·adv on generator iterations, carried over on critic-only ones (NaN
    before the first generator step); d_loss = −wasserstein + gp_weight·gp."""
    parts = _parts()
    trainer = _trainer(parts, 4, n_critic=3, decollate=False, adv_weight=0.1, gp_weight=10.0)
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    trainer.run()
    assert set(outputs[0]) == {"image", "label", "pred", "loss", "g_loss", "content_loss", "adv_loss", "d_loss", "gp",
                               "wasserstein"}
    for it, out in enumerate(outputs, start=1):
        torch.testing.assert_close(out["d_loss"], -out["wasserstein"] + 10.0 * out["gp"])
        assert out["gp"] >= 0 and out["pred"].shape == out["label"].shape and not out["pred"].requires_grad
        if it < 3:
            assert torch.isnan(out["loss"])
            continue
        torch.testing.assert_close(out["loss"], out["content_loss"] + 0.1 * out["adv_loss"])
        assert torch.equal(out["loss"], out["g_loss"])
        if it % 3 == 0:  # the content loss of this iteration's (pre-step) prediction
            torch.testing.assert_close(out["content_loss"], nn.functional.l1_loss(out["pred"], out["label"]))
        else:
            assert torch.equal(out["loss"], outputs[it - 1 - it % 3]["loss"])


@pytest.mark.parametrize("gp_weight", [10.0, 0.5])
def test_critic_gradient_is_that_of_the_penalised_wasserstein_loss(gp_weight):
    """The critic's first step follows ∇[D(fake) − D(real) + λ·GP] (eq. 3), recomputed here on copies with the
    same ε draw."""
    parts = _parts()
    g, d, _, d_opt = parts
    g_copy, d_copy = copy.deepcopy(g), copy.deepcopy(d)
    grads = []
    d_opt.register_step_pre_hook(lambda *a: grads.append([p.grad.clone() for p in d.parameters()]))
    trainer = _trainer(parts, 1, n_critic=5, gp_weight=gp_weight, epoch_length=1)
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: torch.manual_seed(11))
    trainer.run()

    cond, hr, (context,), _ = prepare_batch(next(iter(_loader())))
    with torch.no_grad():
        fake = g_copy(cond, context)
    torch.manual_seed(11)
    gp = gradient_penalty(d_copy, hr, fake)
    (critic_score(d_copy(fake)).mean() - critic_score(d_copy(hr)).mean() + gp_weight * gp).backward()
    for a, p in zip(grads[0], d_copy.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_generator_gradient_is_content_plus_weighted_adversarial_loss():
    """The generator's step follows ∇[L1(G(x), y) − adv_weight·D(G(x))] through the critic just updated."""
    parts = _parts()
    g, d, g_opt, _ = parts
    g_copy, d_copy = copy.deepcopy(g), copy.deepcopy(d)
    seen = {}

    def _pre_step(*args):
        seen["g_grads"] = [p.grad.clone() for p in g.parameters()]
        seen["critic"] = copy.deepcopy(d.state_dict())

    g_opt.register_step_pre_hook(_pre_step)
    _trainer(parts, 1, n_critic=1, adv_weight=0.2, epoch_length=1).run()

    d_copy.load_state_dict(seen["critic"])
    cond, hr, (context,), _ = prepare_batch(next(iter(_loader())))
    fake = g_copy(cond, context)
    (nn.functional.l1_loss(fake, hr) - 0.2 * critic_score(d_copy(fake)).mean()).backward()
    for a, p in zip(seen["g_grads"], g_copy.parameters()):
        torch.testing.assert_close(a, p.grad)
    initial = _parts()[1].state_dict()  # the same seed: the untrained critic
    assert any(not torch.equal(seen["critic"][k], v) for k, v in initial.items())  # it had stepped first


def test_generator_step_leaves_the_critic_alone():
    """The generator's backward pass through the critic adds nothing to the critic's gradients."""
    parts = _parts()
    g, d, g_opt, d_opt = parts
    grads = {}
    d_opt.register_step_post_hook(lambda *a: grads.__setitem__("d", [p.grad.clone() for p in d.parameters()]))
    trainer = _trainer(parts, 1, n_critic=1)
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: grads.__setitem__("end", [p.grad.clone() for p in d.parameters()]),
    )
    trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(grads["d"], grads["end"]))
    assert all(p.requires_grad for p in d.parameters())


def test_without_adversarial_weight_the_generator_trains_as_supervised():
    parts = _parts()
    _trainer(parts, 2, n_critic=1, adv_weight=0.0).run()
    g_ref, _, opt_ref, _ = _parts()
    SupervisedTrainer("cpu", 2, _loader(), g_ref, opt_ref, nn.L1Loss(), prepare_batch=prepare_batch).run()
    for a, b in zip(parts[0].parameters(), g_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _run(ckpt_dir, max_epochs, seed):
    parts = _parts(seed)
    g, d, g_opt, d_opt = parts
    objects = {"network": g, "optimizer": g_opt, "critic": d, "critic_optimizer": d_opt}
    resume = ResumeFromLatest(ckpt_dir, objects)
    handlers = [resume, EpochSeeding(seed=7), EngineCheckpointSaver(str(ckpt_dir), objects, save_interval=1, n_saved=2)]
    trainer = _trainer(parts, max_epochs, n_critic=3, handlers=handlers)
    trainer.run()
    return trainer, objects, resume


def test_resume_matches_uninterrupted_run(tmp_path):
    """4 iterations, a checkpoint (both networks and optimisers), a fresh trainer resumed to 8 iterations: the same
    weights and optimiser states, bit for bit, as 8 uninterrupted iterations (2 iterations per epoch)."""
    full, full_objects, _ = _run(tmp_path / "full", 4, seed=0)
    first, _, _ = _run(tmp_path / "split", 2, seed=0)
    assert first.state.iteration == 4 and latest_checkpoint(tmp_path / "split").name == "checkpoint_epoch=2.pt"
    resumed, resumed_objects, resume = _run(tmp_path / "split", 4, seed=1)  # another initialisation, overwritten
    assert resume.loaded.name == "checkpoint_epoch=2.pt"
    assert full.state.iteration == resumed.state.iteration == 8
    for key in ("network", "critic"):
        for (name, a), b in zip(full_objects[key].state_dict().items(), resumed_objects[key].state_dict().values()):
            assert torch.equal(a, b), f"{key}.{name}"
    for key in ("optimizer", "critic_optimizer"):
        full_state, resumed_state = full_objects[key].state_dict()["state"], resumed_objects[key].state_dict()["state"]
        assert full_state.keys() == resumed_state.keys()
        for i in full_state:
            for name, value in full_state[i].items():
                assert torch.equal(value, resumed_state[i][name]), f"{key}[{i}].{name}"
    assert int(full_objects["optimizer"].state_dict()["state"][0]["step"]) == 2  # generator steps at 3 and 6


def test_invalid_settings_are_refused():
    g, _, g_opt, d_opt = _parts()
    bn_critic = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 3))
    with pytest.raises(ValueError, match="batch normalisation"):
        _trainer((g, bn_critic, g_opt, d_opt), 1)
    with pytest.raises(ValueError, match="n_critic"):
        _trainer(_parts(), 1, n_critic=0)
