"""Self-contained bundle archives: the bundle plus the common package, runnable from the extracted folder."""

import subprocess
import sys
import zipfile

from common.deploy.export import export_bundle
from conftest import REPO

BUNDLE = REPO / "bundles" / "brain_mri_interpolation_super_resolution"


def test_archive_holds_bundle_and_common(tmp_path):
    archive = export_bundle(BUNDLE, tmp_path)
    names = zipfile.ZipFile(archive).namelist()
    root = BUNDLE.name
    assert f"{root}/configs/inference.json" in names and f"{root}/common/data/io.py" in names
    assert not [n for n in names if "__pycache__" in n or "/output/" in n]
    zipfile.ZipFile(archive).extractall(tmp_path / "x")
    # from the extracted bundle root (what MONAI puts on sys.path), `common` is the archived copy
    code = "import sys; sys.path.insert(0, '.'); import common.data.io; print(common.data.io.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "x" / root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert str(tmp_path / "x" / root / "common") in out.stdout


def test_fetch_unpacks_only_an_archive_with_the_listed_hash(tmp_path):
    import pytest

    from common.data import InputFileError, file_hash
    from common.deploy.fetch import fetch_bundle

    archive = export_bundle(BUNDLE, tmp_path / "dist")
    good = file_hash(archive)
    with pytest.raises(InputFileError, match="differs from") as err:
        fetch_bundle(str(archive), "0" * 64, tmp_path / "out")
    assert good in str(err.value)
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # nothing unpacked, no leftovers
    target = fetch_bundle(archive.as_uri(), good, tmp_path / "out")  # a file:// URL, as a download
    assert (target / "configs" / "inference.json").is_file() and (target / "common" / "data" / "io.py").is_file()
    with pytest.raises(InputFileError, match="already exists"):
        fetch_bundle(str(archive), good, tmp_path / "out")
