"""Datalists and the embedded sample (common.data.datalists)."""

import json

import nibabel as nib
import numpy as np
import pytest

from common.data.datalists import build_datalist, embedded_sample_path, inference_datalist
from common.data.io import VolumeError, load_volume


def test_datalists(tmp_path):
    for name in ["a", "b", "c"]:
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    (tmp_path / "notes.txt").write_text("not an image")
    cov = tmp_path / "cov.csv"
    cov.write_text("subject,age,sex\na,30,F\nb,40,M\n")
    dl = build_datalist(tmp_path, val_subjects=["c"], covariates=cov)
    assert [it["subject"] for it in dl["training"]] == ["a", "b"]
    assert dl["training"][1]["age"] == "40" and dl["validation"][0]["subject"] == "c"
    assert len(build_datalist(tmp_path, num_val=1)["validation"]) == 1
    with pytest.raises(VolumeError, match="not found"):
        build_datalist(tmp_path, val_subjects=["zzz"])
    assert [d["image"].endswith(".nii.gz") for d in inference_datalist(str(tmp_path))] == [True] * 3
    # the size of each file is checked when it is loaded, not while the datalist is built
    assert len(inference_datalist(str(tmp_path), min_shape=(8, 8, 8))) == 3
    with pytest.raises(VolumeError, match="is the input folder"):
        inference_datalist(str(tmp_path), output_dir=str(tmp_path / "." ))
    with pytest.raises(VolumeError, match="cannot write"):
        inference_datalist(str(tmp_path), output_dir=str(tmp_path / "notes.txt" / "out"))


def test_embedded_sample_is_the_mni_template(mri_dir):
    path = embedded_sample_path()
    vol = load_volume(path)
    manifest = json.loads((mri_dir / "manifest.json").read_text())
    tmpl = next(v for v in manifest["volumes"] if v["file"].startswith("tmpl_mni152"))
    assert vol.data.shape == tuple(tmpl["shape"])
    assert inference_datalist(None)[0]["label"] == str(path)


def test_real_pairs_refused_by_simulating_configs():
    from common.data import refuse_real_pairs

    hr_only = {"training": [{"label": "a.nii.gz"}], "validation": [{"label": "b.nii.gz"}]}
    assert refuse_real_pairs(hr_only, "d.json") is hr_only
    with pytest.raises(VolumeError, match="d.json.*real LR/HR pairs"):
        refuse_real_pairs({"training": [{"image": "lr.nii.gz", "label": "a.nii.gz"}]}, "d.json")


def test_real_pair_split_checks_pairs_and_holds_one_out():
    from common.data import real_pair_split

    pairs = [{"image": f"lr{i}.nii.gz", "label": f"hr{i}.nii.gz"} for i in range(4)]
    split = real_pair_split({"training": pairs, "validation": []}, "d.json", num_val=1, seed=0)
    assert len(split["training"]) == 3 and len(split["validation"]) == 1
    assert sorted(map(str, split["training"] + split["validation"])) == sorted(map(str, pairs))
    given = {"training": pairs[:3], "validation": pairs[3:]}
    assert real_pair_split(given, "d.json") is given  # a validation list of the user's is kept as it is
    with pytest.raises(VolumeError, match=r"d.json.*training item is not a real pair"):
        real_pair_split({"training": [{"label": "hr.nii.gz"}], "validation": pairs[:1]}, "d.json")
    with pytest.raises(VolumeError, match=r"d.json: 1 pair\(s\) and no 'validation' list"):
        real_pair_split({"training": pairs[:1]}, "d.json")
