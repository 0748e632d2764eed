"""The single-pass slice inferer: per-slice neighbour stacks and context vectors, batching, scale checks."""

import math

import pytest
import torch

from common.inferers import SliceContextInferer
from common.transforms import CovariateContextd, slice_position


class Recorder(torch.nn.Module):
    """Returns the target slice of the stack (channel ``index``) and records every context it is given."""

    def __init__(self, index: int = 1) -> None:
        super().__init__()
        self.index, self.contexts = index, []

    def forward(self, x, context=None):
        self.contexts.append(context)
        return x[:, self.index : self.index + 1]


@pytest.mark.parametrize("slice_batch", [1, 3, 16])
def test_identity_network_gives_the_upsampled_lr_and_contexts(slice_batch):
    lr = torch.rand(1, 1, 5, 6, 7)
    inferer = SliceContextInferer(offsets=(-1, 0, 1), covariates={"age": 50, "sex": "F"}, slice_batch=slice_batch,
                                  progress=False)
    net = Recorder()
    out = inferer(lr, net)
    assert out.shape == (1, 1, 5, 12, 14)
    expected = inferer.upsample(lr[0:1, 0:1].float())[0, 0]
    torch.testing.assert_close(out[0, 0], expected.clamp(0, 1), atol=1e-6, rtol=0)  # to_unit clamps
    context = torch.cat(net.contexts)
    assert context.shape == (5, 4)
    torch.testing.assert_close(context[:, 0], torch.full((5,), 0.5))
    assert (context[:, 1] == 0).all() and context[:, 2].isnan().all()
    torch.testing.assert_close(context[:, 3], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))


def test_without_context_calls_the_network_with_the_stack_alone():
    net = Recorder()
    SliceContextInferer(use_context=False, progress=False)(torch.rand(1, 1, 3, 4, 4), net)
    assert net.contexts and all(c is None for c in net.contexts)


def test_through_plane_factor_refused():
    with pytest.raises(ValueError, match="in-plane"):
        SliceContextInferer(scale_factor=(2, 2, 2))


def test_slice_position_and_context_transform():
    assert slice_position(0, 5) == -1.0 and slice_position(2, 5) == 0.0 and slice_position(4, 5) == 1.0
    assert slice_position(0, 1) == 0.0
    d = CovariateContextd()({"image": 1, "age": 20, "sex": "M", "slice_position": 0.25})
    assert set(d) == {"image", "context"}  # raw covariates removed: items stating different ones still collate
    assert d["context"][:2].tolist() == pytest.approx([0.2, 1.0]) and math.isnan(d["context"][2])
    assert d["context"][3] == 0.25
