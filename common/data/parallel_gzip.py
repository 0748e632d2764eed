"""gzip files compressed on several cores: one standard gzip member (RFC 1952) whose deflate stream is cut into
independently compressed pieces, as pigz does.

A 256³ float32 output is 64 MiB; deflating it with zlib on one core at level 1 took about 1.3 s of a 20 s inference
command on the 2-core machines (docs/performance.md). Each piece is deflated by its own compressor and ends on a byte
boundary (``Z_SYNC_FLUSH``: an empty stored block), so the pieces concatenate into one valid deflate stream; only
the last piece is final. Back-references never cross a piece boundary, which costs well under 1 % of size at
4 MiB pieces. The deflater releases the GIL, so threads run the pieces in parallel.

Levels 1-3 deflate with Intel's ISA-L (``isal.isal_zlib``, the same raw deflate format, any inflater reads it): on
the 64 MiB output it was 6x faster than zlib's level 1 and no larger (docs/performance.md, fifth pass). Level 0
(stored) and levels 4-9 use zlib: ISA-L has no stored level and no levels above 3.
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from isal import isal_zlib

__all__ = ["GZIP_PIECE_BYTES", "gzip_pieces", "write_gzip"]

GZIP_PIECE_BYTES = 4 << 20
# RFC 1952 header: magic, deflate, no flags, mtime 0 (reproducible files, as `gzip -n`), XFL below, OS 255 (unknown)
_MAGIC_DEFLATE_NOFLAGS_NOMTIME = b"\x1f\x8b\x08\x00" + b"\x00\x00\x00\x00"
_UNKNOWN_OS = b"\xff"


def _xfl(level: int) -> bytes:
    """The header's extra-flags byte: 4 for the fastest level, 2 for the best, 0 otherwise (RFC 1952 §2.3.1)."""
    return b"\x04" if level == 1 else b"\x02" if level == 9 else b"\x00"


def _deflate_piece(piece: memoryview, level: int, last: bool) -> bytes:
    """Raw deflate of one piece; byte-aligned and non-final unless ``last``."""
    deflater = isal_zlib if 1 <= level <= isal_zlib.ISAL_BEST_COMPRESSION else zlib
    compressor = deflater.compressobj(level, deflater.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(piece) + compressor.flush(deflater.Z_FINISH if last else deflater.Z_SYNC_FLUSH)


def gzip_pieces(data: bytes | bytearray | memoryview, level: int = 6, workers: int = 1,
                piece_bytes: int = GZIP_PIECE_BYTES):
    """Yield the bytes of one gzip member holding ``data``, in order, its pieces deflated on ``workers`` threads.

    Args:
        data: the uncompressed bytes.
        level: zlib compression level, 0-9.
        workers: threads deflating at once (1: in this thread).
        piece_bytes: uncompressed bytes per independently deflated piece.
    """
    level, workers, piece_bytes = int(level), int(workers), int(piece_bytes)
    if not 0 <= level <= 9:
        raise ValueError(f"gzip level must be 0-9, got {level}")
    if workers < 1 or piece_bytes < 1:
        raise ValueError(f"need workers >= 1 and piece_bytes >= 1, got {workers} and {piece_bytes}")
    view = memoryview(data).cast("B")
    pieces = [view[s:s + piece_bytes] for s in range(0, max(len(view), 1), piece_bytes)]
    finals = [i == len(pieces) - 1 for i in range(len(pieces))]
    yield _MAGIC_DEFLATE_NOFLAGS_NOMTIME + _xfl(level) + _UNKNOWN_OS
    if workers == 1 or len(pieces) == 1:
        yield from map(_deflate_piece, pieces, [level] * len(pieces), finals)
        crc = isal_zlib.crc32(view)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            crc_future = pool.submit(isal_zlib.crc32, view)
            yield from pool.map(_deflate_piece, pieces, [level] * len(pieces), finals)
            crc = crc_future.result()
    yield struct.pack("<II", crc & 0xFFFFFFFF, len(view) & 0xFFFFFFFF)


def write_gzip(path: str | os.PathLike, data: bytes | bytearray | memoryview, level: int = 6,
               workers: int = 1, piece_bytes: int = GZIP_PIECE_BYTES) -> Path:
    """Write ``data`` to ``path`` as one gzip member compressed on ``workers`` threads (see :func:`gzip_pieces`).

    Any gzip reader reads it (Python's gzip, zlib's gzread in ITK and FSL, nibabel): the format is the standard one.
    """
    path = Path(path)
    with open(path, "wb") as f:
        for chunk in gzip_pieces(data, level, workers, piece_bytes):
            f.write(chunk)
    return path
