"""Reader for the standard IDX files (MNIST layout), gzip-compressed or raw."""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from federation.errors import DataError

_IMAGE_MAGIC = 2051  # unsigned byte, 3 dimensions
_LABEL_MAGIC = 2049  # unsigned byte, 1 dimension


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from None


def parse_idx(blob: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse an IDX blob of unsigned bytes into an array of its declared shape."""
    if len(blob) < 4:
        raise DataError(f"{source}: truncated IDX header ({len(blob)} bytes)")
    magic = int.from_bytes(blob[:4], "big")
    if magic not in (_IMAGE_MAGIC, _LABEL_MAGIC):
        raise DataError(f"{source}: not an unsigned-byte IDX file (magic {magic:#010x})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise DataError(f"{source}: truncated IDX header ({len(blob)} bytes)")
    shape = tuple(int.from_bytes(blob[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(blob) - header != expected:
        raise DataError(
            f"{source}: IDX body has {len(blob) - header} bytes, header {shape} needs {expected}"
            " (truncated or corrupted file)"
        )
    return np.frombuffer(blob, dtype=np.uint8, offset=header).reshape(shape).copy()


def read_idx(path: Path) -> np.ndarray:
    return parse_idx(_read_bytes(path), str(path))


def encode_idx(array: np.ndarray) -> bytes:
    """Encode a uint8 array (1-D labels or 3-D images) as IDX bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x0800 | array.ndim
    head = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return head + array.tobytes()
