"""Loading and saving transforms: an in-memory Volume (the Deploy application's DICOM path) is checked as a file
is, and SaveSRd's results are exactly what it writes."""

import nibabel as nib
import numpy as np
import pytest
import torch

from common.data.io import VolumeError, load_volume, volume_from_array
from common.transforms import LoadVolumed, PercentileNormalized, SaveSRd
from input_cases import GOOD, oblique_affine


@pytest.fixture(scope="module")
def base():
    rng = np.random.default_rng(0)
    return (rng.random((8, 10, 12)) * 500 + 10).astype(np.float32)


@pytest.mark.parametrize("case", sorted(GOOD), ids=sorted(GOOD))
def test_volume_in_memory_loads_as_its_file(case, base, tmp_path):
    path = GOOD[case](tmp_path, base)
    img = nib.load(str(path))
    in_memory = volume_from_array(np.asarray(img.dataobj).reshape(img.shape[:3]), img.affine, path)
    a = LoadVolumed("image")({"image": in_memory})["image"]
    b = LoadVolumed("image")({"image": str(path)})["image"]
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(a.affine.numpy(), b.affine.numpy())
    np.testing.assert_array_equal(a.meta["source_ornt"].numpy(), b.meta["source_ornt"].numpy())


@pytest.mark.parametrize(
    "data, problem",
    [
        (np.full((8, 8, 8), 3.0, np.float32), "constant volume"),
        (np.where(np.eye(8)[None].repeat(8, 0) > 0, np.nan, 1.0).astype(np.float32), "NaN/Inf"),
        (np.random.default_rng(0).random((8, 1, 8)).astype(np.float32), "smaller than the method needs"),
    ],
    ids=["constant", "nan", "too small"],
)
def test_volume_in_memory_is_refused_as_a_file_would_be(data, problem):
    vol = volume_from_array(data, oblique_affine(), "series_folder")
    with pytest.raises(VolumeError, match=problem) as err:
        LoadVolumed("image", min_shape=(2, 2, 2))({"image": vol})
    assert str(err.value).startswith("series_folder: ")


def test_results_are_what_is_written(base, tmp_path):
    path = GOOD["lpi"](tmp_path, base)  # every axis flipped: the results carry the orientation back
    d = PercentileNormalized(keys="image")(LoadVolumed("image")({"image": str(path)}))
    pred = torch.nn.functional.interpolate(d["image"][None], scale_factor=(1, 2, 2))[0]
    d["pred"], d["pred_std"] = pred, pred * 0.1
    save = SaveSRd(["pred", "pred_std"], str(tmp_path / "out"), (1, 2, 2), std_keys=["pred_std"])
    results = save.results(d)
    assert not (tmp_path / "out").exists()  # results() writes nothing
    written = save(d)
    for r in results:
        assert written[f"{r.key}_path"] == str(r.path)
        back = load_volume(r.path)
        np.testing.assert_allclose(back.data, r.data, rtol=1e-6)
        np.testing.assert_allclose(back.affine, r.affine, atol=1e-6)
        assert r.data.dtype == np.float32 and r.protect == str(path)
