"""Build the small real subset of MNIST and Fashion-MNIST that ships with the package.

The subset is stratified (the same number of images per class), drawn with a fixed seed from
the standard files, and written as IDX .gz in torchvision's layout, so that it is read by the
same code as the full data. Rebuilding it from the standard files gives the same bytes.
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

from federation.data.idx import encode_idx
from federation.data.sources import DATASETS, DataSource, EMBEDDED_ROOT, load_split

TRAIN_PER_CLASS = 300
TEST_PER_CLASS = 100
SEED = 20251215


def stratified_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    picks = [np.sort(rng.choice(np.flatnonzero(labels == c), per_class, replace=False))
             for c in range(10)]
    return np.sort(np.concatenate(picks))


def build(full_root: Path, out_root: Path = EMBEDDED_ROOT) -> dict:
    manifest = {}
    for dataset, folder in DATASETS.items():
        rng = np.random.default_rng(SEED)
        raw = out_root / folder / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for split, per_class, prefix in (("train", TRAIN_PER_CLASS, "train"), ("test", TEST_PER_CLASS, "t10k")):
            full = load_split(DataSource(full_root, "data-root"), dataset, split)
            idx = stratified_indices(full.labels, per_class, rng)
            for part, array in (("images-idx3", full.images[idx]), ("labels-idx1", full.labels[idx])):
                # mtime=0 keeps the gzip bytes reproducible
                with open(raw / f"{prefix}-{part}-ubyte.gz", "wb") as fh, \
                        gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="") as gz:
                    gz.write(encode_idx(array))
            manifest[f"{dataset}/{split}"] = {"source_indices": idx.tolist(), "per_class": per_class}
    (out_root / "subset_indices.json").write_text(json.dumps(manifest))
    return manifest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("full_root", type=Path, help="root holding MNIST/raw and FashionMNIST/raw")
    parser.add_argument("--out", type=Path, default=EMBEDDED_ROOT)
    args = parser.parse_args()
    build(args.full_root, args.out)
