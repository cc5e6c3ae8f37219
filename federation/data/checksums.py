"""Published md5 of the standard MNIST / Fashion-MNIST files (of the uncompressed IDX content), and
the check applied whenever a full-size standard file is read.

A file with the standard name and the standard row count must be the standard file: a bit flip or a
substituted file is refused. A file of another size (a user's own subset) is read but recorded as
unverified.
"""
from __future__ import annotations

import hashlib

from federation.errors import DataError

KNOWN_MD5 = {
    ("mnist", "train-images-idx3-ubyte"): "6bbc9ace898e44ae57da46a324031adb",
    ("mnist", "train-labels-idx1-ubyte"): "a25bea736e30d166cdddb491f175f624",
    ("mnist", "t10k-images-idx3-ubyte"): "2646ac647ad5339dbf082846283269ea",
    ("mnist", "t10k-labels-idx1-ubyte"): "27ae3e4e09519cfbb04c329615203637",
    ("fashion_mnist", "train-images-idx3-ubyte"): "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    ("fashion_mnist", "train-labels-idx1-ubyte"): "9018921c3c673c538a1fc5bad174d6f9",
    ("fashion_mnist", "t10k-images-idx3-ubyte"): "8181f5470baa50b63fa0f6fddb340f0a",
    ("fashion_mnist", "t10k-labels-idx1-ubyte"): "15d484375f8d13e6eb1aabb0c3f46965",
}
STANDARD_ROWS = {"train": 60000, "test": 10000}


def verify(dataset: str, stem: str, split: str, rows: int, idx_bytes: bytes, where: str) -> str:
    """Returns "verified" or "unverified (N rows, not the standard size)"; raises on a corrupted file."""
    if rows != STANDARD_ROWS[split]:
        return f"unverified ({rows} rows, not the standard size)"
    digest = hashlib.md5(idx_bytes).hexdigest()
    if digest != KNOWN_MD5[(dataset, stem)]:
        raise DataError(f"{where}: md5 {digest} is not the published {KNOWN_MD5[(dataset, stem)]} of the standard "
                        f"{dataset} file {stem}: the file is corrupted or not the standard one")
    return "verified"
