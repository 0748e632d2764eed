"""Covariates of the attention U-Net: encoding (NaN = unknown), the covariates file, the manifest parser."""

import json
import math

import pytest

from common.data import VolumeError, covariates_from_manifest, encode_covariates, read_covariates, with_covariates


@pytest.mark.parametrize(
    "item, expected",
    [
        ({"age": 39, "sex": "M", "group": "healthy"}, [0.39, 1.0, 0.0]),
        ({"age": "71", "sex": "female", "group": "MCI"}, [0.71, 0.0, 1.0]),
        ({"sex": 0, "group": 1}, [math.nan, 0.0, 1.0]),
        ({"age": "unknown", "sex": "other", "group": "stroke"}, [math.nan] * 3),
        ({}, [math.nan] * 3),
    ],
)
def test_encode_covariates(item, expected):
    out = encode_covariates(item)
    assert len(out) == 3
    for got, want in zip(out, expected):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


def test_with_covariates_by_subject_items_win(tmp_path):
    path = tmp_path / "covariates.json"
    path.write_text(json.dumps([{"subject": "a", "age": 30, "sex": "F", "site": "x"}]))
    split = {"training": [{"label": "a.nii.gz", "subject": "a", "age": 31}, {"label": "b.nii.gz", "subject": "b"}],
             "validation": []}
    out = with_covariates(split, path)
    assert out["training"][0] == {"label": "a.nii.gz", "subject": "a", "age": 31, "sex": "F"}  # no "site"
    assert out["training"][1] == {"label": "b.nii.gz", "subject": "b"}
    assert with_covariates(split, None) is split


@pytest.mark.parametrize("content", ["not json", json.dumps([{"age": 3}]), json.dumps({"covariates": "x"})])
def test_bad_covariates_file_names_it(tmp_path, content):
    path = tmp_path / "cov.json"
    path.write_text(content)
    with pytest.raises(VolumeError, match="cov.json"):
        read_covariates(path)
    with pytest.raises(VolumeError, match="not found"):
        read_covariates(tmp_path / "missing.json")


def test_covariates_from_manifest(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"volumes": [
        {"file": "p1.nii.gz", "subject": "M, 39y"},
        {"file": "p2.nii.gz", "subject": "3-year-old boy, normal"},
        {"file": "p3.nii.gz", "subject": "adult epilepsy patient"},
        {"file": "p4.nii.gz", "subject": "F, 70 years, MCI"},
    ]}))
    rows = covariates_from_manifest(manifest)
    assert rows == [
        {"subject": "p1", "age": 39.0, "sex": "M"},
        {"subject": "p2", "age": 3.0, "sex": "M", "group": "healthy"},
        {"subject": "p3"},
        {"subject": "p4", "age": 70.0, "sex": "F", "group": "MCI/dementia"},
    ]
    assert [r["subject"] for r in covariates_from_manifest(manifest, ["p3.nii.gz"])] == ["p3"]

