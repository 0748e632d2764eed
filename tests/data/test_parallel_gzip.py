import gzip
import zlib

import nibabel as nib
import numpy as np
import pytest

from common.data.io import save_volume
from common.data.parallel_gzip import gzip_pieces, write_gzip


def _payload(size: int) -> bytes:
    """Compressible but not trivial: random floats with a run of zeros (like a volume's background)."""
    values = np.random.default_rng(size).standard_normal(size // 4 + 1).astype(np.float32)
    values[: len(values) // 3] = 0
    return values.tobytes()[:size]


def _one_member(blob: bytes) -> bytes:
    """Decompress exactly one gzip member and fail if anything follows it."""
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = d.decompress(blob) + d.flush()
    assert d.eof and d.unused_data == b"", "expected one complete gzip member and nothing after it"
    return out


@pytest.mark.parametrize("size", [0, 1, 1000, 100_003])
@pytest.mark.parametrize("piece_bytes", [7, 4096, 1 << 20])
@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_one_standard_member_whatever_the_pieces(size, piece_bytes, workers, level):
    """Any piece size and thread count gives one gzip member that zlib and Python's gzip decompress to the data,
    the same bytes whatever the number of threads."""
    data = _payload(size)
    blob = b"".join(gzip_pieces(data, level, workers, piece_bytes))
    assert _one_member(blob) == data
    assert gzip.decompress(blob) == data
    assert blob == b"".join(gzip_pieces(data, level, 1, piece_bytes))
    assert blob[:4] == b"\x1f\x8b\x08\x00" and blob[4:8] == b"\x00" * 4  # deflate, no flags, mtime 0


def test_write_gzip_file_reads_back(tmp_path):
    data = _payload(300_000)
    path = write_gzip(tmp_path / "x.gz", data, level=1, workers=2, piece_bytes=65536)
    with gzip.open(path, "rb") as f:
        assert f.read() == data
    # pieces cost little, and ISA-L's level 1 deflates no worse: within 1 % of zlib's single stream at that level
    assert path.stat().st_size <= 1.01 * len(gzip.compress(data, 1)) + 64


def test_level_0_stores():
    """Level 0 keeps zlib's meaning (stored blocks, no compression): ISA-L's level 0 would compress."""
    data = _payload(300_000)
    assert len(b"".join(gzip_pieces(data, 0, 2, 65536))) >= len(data)


@pytest.mark.parametrize("kwargs", [dict(level=10), dict(level=-1), dict(workers=0), dict(piece_bytes=0)])
def test_bad_settings_refused(kwargs):
    with pytest.raises(ValueError):
        b"".join(gzip_pieces(b"abc", **{"level": 1, **kwargs}))


def test_save_volume_gz_readable_by_nibabel_and_itk(tmp_path):
    """The .nii.gz that save_volume now deflates in pieces: the same header and voxels through nibabel and ITK."""
    itk = pytest.importorskip("itk")
    data = np.random.default_rng(0).standard_normal((9, 10, 11)).astype(np.float32)
    affine = np.diag([1.0, 1.2, 2.0, 1.0])
    affine[:3, 3] = [-4, 5, 6]
    gz = save_volume(tmp_path / "out.nii.gz", data, affine)
    plain = save_volume(tmp_path / "out.nii", data, affine)
    assert gzip.decompress(gz.read_bytes()) == plain.read_bytes()
    img = nib.load(str(gz))
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), data)
    np.testing.assert_allclose(img.affine, affine)
    # ITK reads (z, y, x)
    np.testing.assert_array_equal(itk.array_from_image(itk.imread(str(gz))), data.transpose(2, 1, 0))
