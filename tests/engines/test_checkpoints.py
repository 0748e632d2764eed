"""Checkpoints (common.engines.checkpoints): newest checkpoint, resume, final weights, export."""

from __future__ import annotations

import os
import time

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from common.data import InputFileError, find_input_error
from common.engines import EpochSeeding
from common.engines.checkpoints import (
    EngineCheckpointSaver,
    FinalWeightsSaver,
    ResumeFromLatest,
    checkpoint_to_weights,
    latest_checkpoint,
    load_state,
)
from common.networks import AdaGNUNet


@pytest.mark.parametrize(
    "names, expected",
    [
        (["checkpoint_epoch=2.pt", "checkpoint_epoch=10.pt", "checkpoint_epoch=9.pt"], "checkpoint_epoch=10.pt"),
        (["checkpoint_iteration=300.pt", "checkpoint_iteration=1200.pt"], "checkpoint_iteration=1200.pt"),
        (["checkpoint_a.pt", "checkpoint_b.pt"], "checkpoint_b.pt"),  # no numbers: the newest file
        (["best_model.pt"], None),
        ([], None),
    ],
)
def test_latest_checkpoint(tmp_path, names, expected):
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (time.time() + i, time.time() + i))
    found = latest_checkpoint(tmp_path)
    assert (found.name if found else None) == expected
    assert latest_checkpoint(tmp_path / "missing") is None and latest_checkpoint(None) is None


def _trainer(net, opt, max_epochs):
    def step(engine, batch):
        opt.zero_grad()
        loss = net(batch).pow(2).mean()
        loss.backward()
        opt.step()
        return loss.item()

    return Engine(step)


def test_resume_from_latest_restores_network_optimizer_and_epoch(tmp_path):
    torch.manual_seed(0)
    data = [torch.randn(4, 3) for _ in range(3)]
    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = _trainer(net, opt, 2)
    EngineCheckpointSaver(str(tmp_path), {"network": net, "optimizer": opt}, save_interval=1, n_saved=2).attach(trainer)
    trainer.run(data, max_epochs=2)
    assert latest_checkpoint(tmp_path).name == "checkpoint_epoch=2.pt"

    fresh = nn.Linear(3, 2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    resumed = _trainer(fresh, fresh_opt, 3)
    resume = ResumeFromLatest(tmp_path, {"network": fresh, "optimizer": fresh_opt})
    resume.attach(resumed)
    epochs = []
    resumed.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    before = None

    @resumed.on(Events.STARTED)
    def _check(engine):
        nonlocal before
        before = {k: v.clone() for k, v in fresh.state_dict().items()}

    resumed.run(data, max_epochs=3)
    assert resume.loaded.name == "checkpoint_epoch=2.pt"
    assert epochs == [3]  # only the remaining epoch ran
    for k, v in torch.load(resume.loaded, weights_only=True)["network"].items():
        torch.testing.assert_close(before[k], v)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    net = nn.Linear(3, 2)
    engine = _trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), 1)
    resume = ResumeFromLatest(tmp_path / "none", {"network": net})
    resume.attach(engine)
    engine.run([torch.randn(2, 3)], max_epochs=1)
    assert resume.loaded is None and engine.state.epoch == 1


def test_final_weights_and_checkpoint_export(tmp_path):
    net = nn.Linear(3, 2)
    FinalWeightsSaver(net, tmp_path / "sub" / "model.pt")()
    state = torch.load(tmp_path / "sub" / "model.pt", weights_only=True)
    torch.testing.assert_close(state["weight"], net.weight.detach())
    torch.save({"network": net.state_dict(), "optimizer": {}}, tmp_path / "ckpt.pt")
    out = checkpoint_to_weights(tmp_path / "ckpt.pt", tmp_path / "w.pt")
    assert set(torch.load(out, weights_only=True)) == {"weight", "bias"}
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.startswith(".")]


def _saved_checkpoints(tmp_path, epochs=2):
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = _trainer(net, opt, epochs)
    EngineCheckpointSaver(str(tmp_path), {"network": net, "optimizer": opt}, save_interval=1, n_saved=2).attach(trainer)
    trainer.run([torch.randn(4, 3) for _ in range(2)], max_epochs=epochs)
    return latest_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_damaged_checkpoint_is_refused_before_anything_loads(tmp_path, damage):
    latest = _saved_checkpoints(tmp_path)
    if damage == "truncated":
        latest.write_bytes(latest.read_bytes()[:300])
    elif damage == "garbage":
        latest.write_bytes(b"\0" * 1000)
    else:  # another network's checkpoint
        torch.save({"network": nn.Linear(5, 2).state_dict(), "optimizer": {}, "trainer": {}}, latest)
    net = nn.Linear(3, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    engine = _trainer(net, opt, 3)
    ResumeFromLatest(tmp_path, {"network": net, "optimizer": opt}).attach(engine)
    with pytest.raises(Exception) as err:
        engine.run([torch.randn(4, 3)], max_epochs=3)
    bad = find_input_error(err.value)
    assert bad is not None and bad.path == str(latest), err.value
    assert ("not a readable" if damage != "foreign" else "do not fit") in bad.problem
    assert "checkpoint_epoch=1.pt" in bad.problem  # names the previous checkpoint to fall back to
    for k, v in net.state_dict().items():  # nothing was loaded half-way
        assert torch.equal(v, before[k])


def test_epoch_seeding_makes_each_epoch_draw_the_same_whatever_came_before():
    draws = {}

    def run(start_epoch, waste):
        engine = Engine(lambda e, b: None)
        EpochSeeding(seed=5).attach(engine)
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: draws.setdefault((waste, e.state.epoch), torch.rand(3)))
        engine.state.epoch = start_epoch
        torch.rand(waste)  # a killed run's, or a validator's, leftover draws
        engine.run([0], max_epochs=3)

    run(0, 0)
    run(1, 7)  # resumed after epoch 1, with a different RNG history
    assert torch.equal(draws[(0, 2)], draws[(7, 2)]) and torch.equal(draws[(0, 3)], draws[(7, 3)])
    assert not torch.equal(draws[(0, 2)], draws[(0, 3)])


def _teacher_and_student():
    """A small AdaGN U-Net with attention in its deepest level and middle, and the same network without any."""
    torch.manual_seed(0)
    kw = dict(channels=(8, 16), cond_channels=16, num_res_blocks=1)
    teacher = AdaGNUNet(2, 2, 1, attention_levels=(False, True), **kw)
    student = AdaGNUNet(2, 2, 1, attention_levels=(False, False), mid_attention=False, **kw)
    return teacher, student


def test_init_weights_not_strict_loads_the_shared_tensors_and_names_the_rest(tmp_path, caplog):
    teacher, student = _teacher_and_student()
    path = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), path)
    with pytest.raises(InputFileError, match="unexpected"):  # strict, the default: refused before anything loads
        ResumeFromLatest(tmp_path / "none", {"network": student}, init_weights=path)(Engine(lambda e, b: None))
    ResumeFromLatest(tmp_path / "none", {"network": student}, init_weights=path, init_strict="false")(
        Engine(lambda e, b: None))
    shared = set(student.state_dict()) & set(teacher.state_dict())
    assert shared == set(student.state_dict())  # the student is the teacher without attention blocks
    for k in shared:
        torch.testing.assert_close(student.state_dict()[k], teacher.state_dict()[k])
    assert "of the file's were ignored" in caplog.text and ".attn." in caplog.text


def test_init_weights_not_strict_still_refuses_a_wrong_shape(tmp_path):
    teacher, _ = _teacher_and_student()
    wider = AdaGNUNet(2, 2, 1, channels=(8, 32), cond_channels=16, num_res_blocks=1)
    path = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), path)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(InputFileError, match="wrong shape"):
        load_state(wider, path, strict=False)
    for k, v in wider.state_dict().items():  # nothing was copied
        torch.testing.assert_close(v, before[k])


def test_init_weights_not_strict_refuses_weights_sharing_no_name(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(InputFileError, match="no tensor"):
        load_state(_teacher_and_student()[1], path, strict=False)
