"""Trusted weights (common.data.weights, common.engines.load_state): listed hashes checked before use,
weights_only loading, damaged or foreign files refused with one clear error and the network left untouched."""

import pytest
import torch
from torch import nn

from common.data import InputFileError, file_hash, listed_hash, verify_listed
from common.engines import load_state


@pytest.fixture()
def bundle(tmp_path):
    """A bundle root with models/model.pt listed in large_files.yml."""
    torch.manual_seed(0)
    (tmp_path / "models").mkdir()
    weights = tmp_path / "models" / "model.pt"
    torch.save(nn.Linear(3, 2).state_dict(), weights)
    (tmp_path / "large_files.yml").write_text(
        "large_files:\n  - path: \"models/model.pt\"\n    url: \"x\"\n"
        f"    hash_val: \"{file_hash(weights)}\"\n    hash_type: \"sha256\"\n"
    )
    return tmp_path


def test_listed_weights_verify_and_load(bundle):
    weights, manifest = bundle / "models" / "model.pt", bundle / "large_files.yml"
    assert listed_hash(manifest, weights) == ("sha256", file_hash(weights))
    assert verify_listed(weights, manifest) is True
    net = load_state(nn.Linear(3, 2), weights, large_files=manifest)
    torch.testing.assert_close(net.weight, torch.load(weights, weights_only=True)["weight"])


def test_unlisted_weights_load_without_a_hash(bundle, tmp_path_factory):
    other = tmp_path_factory.mktemp("mine") / "mine.pt"
    torch.save(nn.Linear(3, 2).state_dict(), other)
    assert verify_listed(other, bundle / "large_files.yml") is False
    load_state(nn.Linear(3, 2), other, large_files=bundle / "large_files.yml")


def test_changed_weights_are_refused_naming_both_hashes(bundle):
    weights, manifest = bundle / "models" / "model.pt", bundle / "large_files.yml"
    listed = file_hash(weights)
    torch.save(nn.Linear(3, 2).state_dict(), weights)  # same shapes, other values
    net = nn.Linear(3, 2)
    before = net.weight.detach().clone()
    with pytest.raises(InputFileError) as err:
        load_state(net, weights, large_files=manifest)
    assert err.value.path == str(weights) and listed in err.value.problem and file_hash(weights) in err.value.problem
    assert torch.equal(net.weight, before)


@pytest.mark.parametrize("damage, problem", [("truncated", "not a readable"), ("pickle", "not a readable"),
                                             ("foreign", "do not fit"), ("missing", "no such")])
def test_damaged_or_foreign_weights_are_refused(tmp_path, damage, problem):
    path = tmp_path / "w.pt"
    torch.save(nn.Linear(3, 2).state_dict(), path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "pickle":  # arbitrary objects: weights_only refuses to unpickle them
        torch.save({"weight": torch.zeros(2, 3), "code": nn.Linear(3, 2)}, path)
    elif damage == "foreign":
        torch.save(nn.Linear(4, 2).state_dict(), path)
    else:
        path.unlink()
    net = nn.Linear(3, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(InputFileError, match=problem) as err:
        load_state(net, path)
    assert err.value.path == str(path)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
