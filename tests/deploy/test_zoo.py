"""Model-zoo distribution end to end, offline: the zoo's checks, a loopback HTTP zoo, MONAI's own download and
large-file commands, inference from the downloaded copy; and the torch.export programs of the learned bundles."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from bundle_cli import BUNDLES, IDS, LEARNED, LEARNED_IDS, SCHEMA, infer, ok
from common.data import file_hash
from common.deploy.export import export_bundle, zoo_problems
from common.deploy.program import bundle_network, example_input, export_program, max_difference
from conftest import REPO, SUBPROCESS_THREADS

INTERPOLATION = REPO / "bundles" / "brain_mri_interpolation_super_resolution"
EDM25D = REPO / "bundles" / "brain_mri_edm25d_super_resolution"


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_zoo_accepts_every_bundle(bundle):
    assert zoo_problems(bundle, SCHEMA) == []


def test_program_of_a_config_without_network_is_refused(tmp_path):
    bundle = tmp_path / INTERPOLATION.name
    shutil.copytree(INTERPOLATION, bundle, ignore=shutil.ignore_patterns("output", "eval", "__pycache__"))
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    del config["network"]
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="define no network"):
        export_program(bundle, tmp_path / "model.pt2")
    assert not (tmp_path / "model.pt2").exists()


def test_zoo_problems_are_all_named_and_nothing_is_written(tmp_path):
    bundle = tmp_path / INTERPOLATION.name
    shutil.copytree(INTERPOLATION, bundle, ignore=shutil.ignore_patterns("output", "eval", "__pycache__"))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    meta["version"] = "9.9.9"  # not in the changelog
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    (bundle / "LICENSE").unlink()
    (bundle / "docs" / "README.md").unlink()
    (bundle / "models").mkdir(exist_ok=True)
    (bundle / "models" / "extra.pt").write_bytes(b"weights")
    (bundle / "large_files.yml").write_text(yaml.safe_dump({"large_files": [
        {"path": "models/extra.pt", "url": "http://127.0.0.1/x", "hash_val": "0" * 64, "hash_type": "sha256"},
        {"path": "models/absent.pt", "url": "", "hash_val": "0" * 64, "hash_type": "sha256"},
    ]}))
    problems = "\n".join(zoo_problems(bundle, SCHEMA))
    for expected in ["missing LICENSE", "missing docs/README.md", "'9.9.9' is not listed in its changelog",
                     f"models/extra.pt: sha256 {file_hash(bundle / 'models' / 'extra.pt')} differs from the listed "
                     f"{'0' * 64}", "'models/absent.pt' lacks url"]:
        assert expected in problems, problems
    with pytest.raises(SystemExit, match="missing LICENSE"):
        export_bundle(bundle, tmp_path / "dist")
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())


@pytest.fixture()
def loopback_zoo(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path/"zoo"``; yields (folder, base URL)."""
    root = tmp_path / "zoo"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def monai_bundle(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=SUBPROCESS_THREADS, NO_PROXY="127.0.0.1",
               no_proxy="127.0.0.1")
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=900)


@pytest.mark.slow
def test_download_from_a_loopback_zoo_then_inference_equals_the_repository(loopback_zoo, small_volume, tmp_path):
    root, url = loopback_zoo
    name = EDM25D.name
    archive = export_bundle(EDM25D, root, weights_url=url, schema=SCHEMA, program=True)
    assert archive == root / f"{name}.zip"
    assert not [n for n in zipfile.ZipFile(archive).namelist() if n.endswith((".pt", ".pt2"))]  # hosted apart

    ok(monai_bundle("download", "--name", name, "--url", f"{url}/{name}.zip", "--bundle_dir", str(tmp_path / "dl")))
    copy = tmp_path / "dl" / name
    assert (copy / "configs" / "inference.json").is_file() and (copy / "common" / "data" / "io.py").is_file()
    assert not (copy / "models" / "model.pt").exists()

    # before the weights are fetched, inference names the file and the command that fetches it
    missing = infer(copy, small_volume, tmp_path / "out_missing")
    assert missing.returncode != 0 and "download_large_files" in missing.stderr, missing.stderr[-2000:]

    # a tampered file on the server is refused by MONAI's hash check, and nothing lands in the bundle
    served = root / name / "models" / "model.pt"
    good = served.read_bytes()
    served.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    refused = monai_bundle("download_large_files", "--bundle_path", str(copy))
    assert refused.returncode != 0 and "hash check of downloaded file failed" in refused.stderr, refused.stderr[-2000:]
    assert not (copy / "models" / "model.pt").exists()

    served.write_bytes(good)
    ok(monai_bundle("download_large_files", "--bundle_path", str(copy)))
    listed = yaml.safe_load((copy / "large_files.yml").read_text())["large_files"]
    assert {e["path"] for e in listed} == {"models/model.pt", "models/model_regression.pt", "models/model_student.pt",
                                           "models/model.pt2"}
    for entry in listed:
        assert entry["url"] == f"{url}/{name}/{entry['path']}"
        assert file_hash(copy / entry["path"]) == entry["hash_val"]
    for entry in yaml.safe_load((EDM25D / "large_files.yml").read_text())["large_files"]:
        assert file_hash(copy / entry["path"]) == entry["hash_val"]  # the repository's weights, byte for byte
    network, meta = bundle_network(EDM25D)
    x = example_input(meta["network_data_format"])
    assert max_difference(network, torch.export.load(str(copy / "models" / "model.pt2")).module(), x) == 0.0

    ok(infer(copy, small_volume, tmp_path / "out_zoo"))
    ok(infer(EDM25D, small_volume, tmp_path / "out_repo"))
    ours = nib.load(str(tmp_path / "out_repo" / "crop_dev03_sr.nii.gz"))
    theirs = nib.load(str(tmp_path / "out_zoo" / "crop_dev03_sr.nii.gz"))
    assert np.array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
    assert np.array_equal(ours.affine, theirs.affine)


PROGRAMS = [(b, ["configs/inference.json"]) for b in LEARNED] + [
    (EDM25D, ["configs/inference.json", "configs/regression.json"])]


@pytest.mark.slow
@pytest.mark.parametrize("bundle,configs", PROGRAMS, ids=LEARNED_IDS + ["edm25d_regression"])
def test_torch_export_program_equals_the_eager_network(bundle, configs, tmp_path):
    path, difference = export_program(bundle, tmp_path / "model.pt2", configs)
    assert difference == 0.0  # the same ATen kernels; export_program itself refuses above 1e-5
    network, meta = bundle_network(bundle, configs)
    program = torch.export.load(str(path)).module()
    # dynamic sizes: another batch and a larger grid than the export's example
    x = example_input(meta["network_data_format"], batch=3, size=96 if x_is_2d(meta) else 48)
    assert max_difference(network, program, x) == 0.0
    with pytest.raises(SystemExit, match="already exists"):
        export_program(bundle, path, configs)


def x_is_2d(meta: dict) -> bool:
    return len(meta["network_data_format"]["inputs"]["image"]["spatial_shape"]) == 2
