"""Augmented 2.5D training patches: LR re-simulated from the augmented HR, exact crops, the identity case."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from common.engines.checkpoints import ResumeFromLatest
from common.transforms.degrade import BlockAverage
from common.transforms.slice_augment import RandResimulatedSlicePatchd
from common.transforms.slices import RandSlicePatchd, SliceForegroundd
from common.transforms.upsample import UpsampleLRd


def _cached(shape, seed=0):
    """What the cached training preprocessing holds: HR label, its upsampled block-average LR, fractions."""
    vol = torch.rand(1, *shape, generator=torch.Generator().manual_seed(seed))
    data = UpsampleLRd((1, 2, 2))({"label": vol, "image": BlockAverage((1, 2, 2))(vol)})
    return SliceForegroundd("label", axes=(0, 1, 2))(data)


@pytest.mark.parametrize("shape", [(20, 40, 36), (9, 12, 10), (12, 64, 50)])
@pytest.mark.parametrize("offsets", [(-1, 0), (-1, 0, 1)])
def test_identity_equals_cached_path(shape, offsets):
    """No augmentation: the same patches, bit for bit, as cropping the cached upsampled LR (slices smaller than
    the patch included), so re-simulating inside a margin reproduces upsampling the whole volume."""
    data = _cached(shape)
    cached = RandSlicePatchd((16, 16), offsets, (1, 2, 2), pos_fraction=0.5)
    resim = RandResimulatedSlicePatchd((16, 16), offsets, (1, 2, 2), pos_fraction=0.5)
    for seed in range(25):
        cached.set_random_state(seed)
        resim.set_random_state(seed)
        a, b = cached(data), resim(data)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def _find(label, vol, patch):
    """(axis, slice, flips) such that label = the flipped block-aligned crop of vol's slice, or None."""
    for axis in range(3):
        view = vol.movedim(axis, 0)
        for i, flips in itertools.product(range(view.shape[0]), itertools.product((False, True), repeat=2)):
            ref = label
            for a, f in enumerate(flips):
                ref = ref.flip(a) if f else ref
            for y0 in range(0, view.shape[1] - patch + 1, 2):
                for z0 in range(0, view.shape[2] - patch + 1, 2):
                    if torch.equal(view[i, y0 : y0 + patch, z0 : z0 + patch], ref):
                        return axis, i, flips
    return None


def test_augmented_pair_is_resimulated_from_augmented_hr():
    """gamma 2: the label is a flipped, block-aligned crop of HR² along any axis, and the conditioning's target
    slice is the block average of that label (nearest upsampling makes it readable), not the square of the
    cached LR: augmenting the LR beside the HR would fail here."""
    torch.manual_seed(0)
    vol = torch.rand(1, 10, 12, 14) * 0.5 + 0.5
    data = SliceForegroundd("label", axes=(0, 1, 2))({"label": vol})
    t = RandResimulatedSlicePatchd(
        (8, 8), (-1, 0), (1, 2, 2), upsample_mode="nearest", slice_axes=(0, 1, 2), prob=1.0,
        gamma_range=(2.0, 2.0), pos_fraction=0.5,
    )
    t.set_random_state(0)
    seen_axes, seen_flips = set(), set()
    for _ in range(24):
        item = t(data)
        label, cond = item["label"][0], item["image"]
        found = _find(label, vol[0] ** 2, 8)
        assert found is not None
        seen_axes.add(found[0])
        seen_flips.add(found[2])
        block = nn.functional.avg_pool2d(label[None, None], 2)[0, 0]
        torch.testing.assert_close(cond[1, ::2, ::2], block)
        squared_lr = nn.functional.avg_pool2d(label.sqrt()[None, None], 2)[0, 0] ** 2
        assert not torch.allclose(cond[1, ::2, ::2], squared_lr)
    assert seen_axes == {0, 1, 2} and len(seen_flips) > 1


def test_intensity_map_range_and_determinism():
    data = _cached((12, 32, 32))
    t = RandResimulatedSlicePatchd((16, 16), prob=1.0, gamma_range=(0.4, 1.5), stretch_range=(1.0, 1.5))
    t.set_random_state(3)
    a = [t(data) for _ in range(5)]
    t.set_random_state(3)
    b = [t(data) for _ in range(5)]
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        assert 0.0 <= float(x["label"].min()) and float(x["label"].max()) <= 1.0
    assert not torch.equal(a[0]["label"], a[1]["label"])


@pytest.mark.parametrize(
    "kwargs",
    [{"slice_axes": ()}, {"slice_axes": (3,)}, {"gamma_range": (0.0, 1.0)}, {"stretch_range": (-1, 1)},
     {"strip_prob": 1.5}, {"strip_depth_range": (-1.0, 4.0)}],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        RandResimulatedSlicePatchd((8, 8), **kwargs)


def test_slice_foreground_per_axis():
    vol = torch.zeros(1, 4, 6, 8)
    vol[0, 1, :3, :] = 1.0
    d = SliceForegroundd("label", axes=(0, 1, 2))({"label": vol})["slice_foreground"]
    torch.testing.assert_close(d[0], torch.tensor([0.0, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(d[1], torch.tensor([0.25, 0.25, 0.25, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(d[2], torch.full((8,), 3 / 24))
    # the default keeps the plain axis-0 tensor RandSlicePatchd reads
    torch.testing.assert_close(SliceForegroundd("label")({"label": vol})["slice_foreground"], d[0])


def _engine():
    from ignite.engine import Engine

    return Engine(lambda engine, batch: None)


def test_init_weights_fine_tunes_only_without_checkpoint(tmp_path):
    source, net = nn.Linear(3, 2), nn.Linear(3, 2)
    torch.save(source.state_dict(), tmp_path / "model.pt")
    engine = _engine()
    ResumeFromLatest(tmp_path / "ckpt", {"network": net}, init_weights=str(tmp_path / "model.pt")).attach(engine)
    engine.run([0], max_epochs=1)
    torch.testing.assert_close(net.weight, source.weight)

    # a checkpoint to resume takes precedence over the initial weights
    (tmp_path / "ckpt").mkdir()
    other = nn.Linear(3, 2)
    torch.save({"network": other.state_dict()}, tmp_path / "ckpt" / "checkpoint_epoch=1.pt")
    engine = _engine()
    resume = ResumeFromLatest(tmp_path / "ckpt", {"network": net}, init_weights=str(tmp_path / "model.pt"),
                              engine_key=None)
    resume.attach(engine)
    engine.run([0], max_epochs=1)
    assert resume.loaded is not None
    torch.testing.assert_close(net.weight, other.weight)


def test_init_weights_missing_file_is_an_error(tmp_path):
    engine = _engine()
    ResumeFromLatest(tmp_path, {"network": nn.Linear(3, 2)}, init_weights=str(tmp_path / "nope.pt")).attach(engine)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        engine.run([0], max_epochs=1)


def test_background_zeroing_keeps_the_pair_exact():
    """Zeroed background: an LR voxel of exactly 0 over HR voxels of exactly 0, every other block untouched."""
    vol = torch.rand(1, 6, 24, 24, generator=torch.Generator().manual_seed(1)) * 0.3
    data = SliceForegroundd("label")({"label": vol})
    t = RandResimulatedSlicePatchd(
        (16, 16), (-1, 0), (1, 2, 2), upsample_mode="nearest", prob=1.0, background_prob=1.0,
        background_range=(0.15, 0.15), pos_fraction=0.0,
    )
    t.set_random_state(0)
    zeroed = 0
    for _ in range(10):
        item = t(data)
        label, lr = item["label"][0], item["image"][1, ::2, ::2]
        blocks = nn.functional.avg_pool2d(label[None, None], 2)[0, 0]
        torch.testing.assert_close(lr, blocks)
        dropped = lr == 0
        zeroed += int(dropped.sum())
        assert torch.all(label.view(8, 2, 8, 2).permute(0, 2, 1, 3)[dropped] == 0)
        assert torch.all(lr[~dropped] > 0.15)
    assert zeroed > 0


def test_add_conditioning_channels_preserves_the_function(tmp_path):
    from common.diffusion.edm import SRDenoiser
    from common.engines.checkpoints import add_conditioning_channels
    from common.networks import AdaGNUNet

    torch.manual_seed(0)
    old = SRDenoiser(AdaGNUNet(2, 3, 1, channels=(8, 16), cond_channels=16, num_res_blocks=1), num_cond=2)
    nn.init.normal_(old.model.conv_out.weight, std=0.1)
    torch.save(old.state_dict(), tmp_path / "old.pt")
    add_conditioning_channels(tmp_path / "old.pt", tmp_path / "new.pt", [2])
    new = SRDenoiser(AdaGNUNet(2, 4, 1, channels=(8, 16), cond_channels=16, num_res_blocks=1), num_cond=3)
    new.load_state_dict(torch.load(tmp_path / "new.pt", weights_only=True))
    x, cond, nxt = torch.randn(2, 1, 16, 16), torch.rand(2, 2, 16, 16) * 2 - 1, torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        a = old(x, sigma=torch.tensor([0.5, 3.0]), cond=cond)
        b = new(x, sigma=torch.tensor([0.5, 3.0]), cond=torch.cat([cond, nxt], 1))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError):
        add_conditioning_channels(tmp_path / "old.pt", tmp_path / "bad.pt", [4])


def test_head_depth_is_the_distance_inside_the_head():
    from common.transforms.mask import HeadDepthd

    vol = torch.zeros(1, 20, 20, 20)
    vol[0, 4:16, 4:16, 4:16] = 1.0
    depth = HeadDepthd("label")({"label": vol})["head_depth"]
    assert depth.shape == vol.shape and depth.dtype == torch.float16
    assert torch.all(depth[vol == 0] == 0)
    # the cube's face voxels are 1 voxel from the outside, its centre 6
    assert float(depth[0, 4, 10, 10]) == 1.0 and float(depth[0, 10, 10, 10]) == 6.0
    # a crop inside the head has no surface: nothing is shallow
    inside = 0.5 + 0.5 * torch.rand(1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.all(torch.isinf(HeadDepthd("label")({"label": inside})["head_depth"]))


def test_strip_zeroes_the_shallow_voxels_and_keeps_the_pair_exact():
    """Stripping at depth 3: the label is the unstripped crop with the voxels shallower than 3 zeroed, and the
    target LR slice is the block average of that stripped label."""
    from common.transforms.mask import HeadDepthd

    vol = torch.zeros(1, 10, 28, 28)
    vol[0, 1:9, 3:25, 4:24] = 0.5 + 0.5 * torch.rand(8, 22, 20, generator=torch.Generator().manual_seed(0))
    data = HeadDepthd("label")(SliceForegroundd("label")({"label": vol}))
    depth_data = {"label": data["head_depth"].float(), "slice_foreground": data["slice_foreground"]}
    kwargs = dict(patch_size=(16, 16), offsets=(-1, 0), scale_factor=(1, 2, 2), upsample_mode="nearest")
    strip = RandResimulatedSlicePatchd(strip_prob=1.0, strip_depth_range=(3.0, 3.0), **kwargs)
    plain = RandResimulatedSlicePatchd(**kwargs)
    zeroed = kept = 0
    for seed in range(12):
        strip.set_random_state(seed)
        plain.set_random_state(seed)
        label, cond = (t := strip(data))["label"][0], t["image"]
        unstripped = plain(data)["label"][0]
        plain.set_random_state(seed)
        depth = plain(depth_data)["label"][0]
        torch.testing.assert_close(label, unstripped * (depth >= 3))
        torch.testing.assert_close(cond[1, ::2, ::2], nn.functional.avg_pool2d(label[None, None], 2)[0, 0])
        zeroed += int(((unstripped > 0) & (label == 0)).sum())
        kept += int((label > 0).sum())
    assert zeroed > 0 and kept > 0


def test_strip_without_depth_map_is_an_error():
    t = RandResimulatedSlicePatchd((8, 8), strip_prob=1.0)
    with pytest.raises(KeyError, match="head_depth"):
        t(_cached((6, 16, 16)))


def test_real_pair_conditioning_is_cut_from_the_lr_scan():
    """``paired_key``: the conditioning slices are the LR scan's, at the label's place, under the same flips and
    intensity map (gamma 2 squares both); in-plane factors other than 1 are refused."""
    torch.manual_seed(0)
    hr = torch.rand(1, 10, 12, 14) * 0.5 + 0.5
    lr = torch.rand(1, 10, 12, 14) * 0.5 + 0.5
    data = SliceForegroundd("label", axes=(0, 1, 2))({"label": hr, "image": lr})
    patches = RandResimulatedSlicePatchd((8, 8), (-1, 0, 1), (1, 1, 1), slice_axes=(0, 1, 2), paired_key="image",
                                         prob=1.0, gamma_range=(2.0, 2.0), num_samples=20)
    patches.set_random_state(0)
    for patch in patches(data):
        found = None
        for axis in range(3):
            view_hr, view_lr = hr[0].movedim(axis, 0), lr[0].movedim(axis, 0)
            for i in range(view_hr.shape[0]):
                for flips in itertools.product((False, True), repeat=2):
                    label, cond = patch["label"][0], patch["image"]
                    for a, f in enumerate(flips):
                        label, cond = (label.flip(a), cond.flip(1 + a)) if f else (label, cond)
                    for y0, z0 in itertools.product(range(view_hr.shape[1] - 7), range(view_hr.shape[2] - 7)):
                        sl = (slice(y0, y0 + 8), slice(z0, z0 + 8))
                        if torch.allclose(view_hr[i][sl] ** 2, label):
                            idx = [min(max(i + o, 0), view_hr.shape[0] - 1) for o in (-1, 0, 1)]
                            found = torch.allclose(view_lr[idx][(slice(None),) + sl] ** 2, cond)
        assert found, "conditioning is not the LR scan's slices at the label's place"
    with pytest.raises(ValueError, match=r"in-plane factors \(1, 1\)"):
        RandResimulatedSlicePatchd((8, 8), scale_factor=(1, 2, 2), paired_key="image")


def test_gmm_option_remaps_each_tissue_class_of_the_hr_before_simulating():
    """``gmm_prob`` 1 with fixed draws (means +0.1, stds x1): inside the brain the label is the HR plus 0.1,
    outside unchanged, and the conditioning is simulated from that remapped HR (its block average)."""
    from common.transforms import TissueModeld

    torch.manual_seed(0)
    hr = torch.rand(1, 8, 16, 16) * 0.3 + 0.3
    mask = torch.zeros_like(hr)
    mask[:, :, 4:12, 4:12] = 1
    data = TissueModeld("label")({"label": hr, "brain_mask": mask})
    assert data["tissue"].shape == hr.shape and set(data["tissue"].unique().tolist()) <= {0, 1, 2, 3}
    assert data["tissue"][mask == 0].max() == 0 and data["tissue_stats"].shape == (7,)
    data = SliceForegroundd("label")(data)
    patches = RandResimulatedSlicePatchd((16, 16), (0,), (1, 2, 2), gmm_prob=1.0, gmm_mean_shift=(0.1 / 0.3, 0.1 / 0.3),
                                         gmm_std_scale=(1.0, 1.0), pos_fraction=0.0)
    patches.set_random_state(0)
    span = float(data["tissue_stats"][6])
    for _ in range(5):
        patch = patches(data)
        label = patch["label"][0]
        i = next(i for i in range(8) if torch.allclose(hr[0, i][mask[0, i] == 0], label[mask[0, i] == 0]))
        inside = mask[0, i] > 0
        torch.testing.assert_close(label[inside], (hr[0, i][inside] + span * 0.1 / 0.3).clamp(0, 1))
        torch.testing.assert_close(patch["image"][0], _simulated(label))
    with pytest.raises(KeyError, match="TissueModeld"):
        RandResimulatedSlicePatchd((16, 16), (0,), (1, 2, 2), gmm_prob=1.0)({"label": hr})


def _simulated(label):
    """The conditioning simulated from a whole (16, 16) HR slice: x2 block average, cubic upsampling."""
    from common.transforms.upsample import GridUpsample

    return GridUpsample((2, 2), "cubic")(BlockAverage((1, 2, 2))(label[None, None]))[0, 0]
