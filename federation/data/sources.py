"""Where the images come from: a named data root, $ALIGNFL_DATA_DIR, torchvision's
download (only when asked for), or the small real subset embedded in this package."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from federation.data.checksums import verify
from federation.data.idx import encode_idx, read_idx
from federation.errors import DataError

DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
OTHER_DATASET = {"mnist": "fashion_mnist", "fashion_mnist": "mnist"}
EMBEDDED_ROOT = Path(__file__).resolve().parent / "embedded"
ENV_VAR = "ALIGNFL_DATA_DIR"
_STEMS = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class Split:
    """One split of one dataset: uint8 images (N, 28, 28) and int64 labels (N,)."""

    dataset: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    files: dict = field(default_factory=dict)  # file name -> sha256 of the file as read
    checksums: dict = field(default_factory=dict)  # file name -> "verified" against the published md5, or why not

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class DataSource:
    root: Path
    kind: str  # "data-root" | "env" | "download" | "embedded"


def check_dataset_name(name: str) -> str:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return name


def _find_file(root: Path, dataset: str, stem: str) -> Path | None:
    raw = root / DATASETS[dataset] / "raw"
    for candidate in (raw / f"{stem}.gz", raw / stem):
        if candidate.is_file():
            return candidate
    return None


def _has_dataset(root: Path, dataset: str) -> bool:
    return all(_find_file(root, dataset, stem) is not None for stem in _STEMS.values())


def _download(dataset: str) -> Path:
    import torchvision  # imported lazily: only this path needs it

    cache = Path(os.environ.get("ALIGNFL_CACHE_DIR", Path.home() / ".cache" / "alignfl-audit")) / "data"
    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST}[dataset]
    try:
        for train in (True, False):
            cls(root=str(cache), train=train, download=True)
    except Exception as err:  # network errors come in many types
        raise DataError(f"torchvision download of {dataset} failed: {err}") from None
    return cache


def resolve_source(dataset: str, data_root: str | Path | None = None, download: bool = False,
                   allow_embedded: bool = True) -> DataSource:
    """Find the dataset, searching in the documented order, or fail naming every place searched."""
    check_dataset_name(dataset)
    folder = DATASETS[dataset]
    if data_root is not None:
        root = Path(data_root).expanduser()
        if not _has_dataset(root, dataset):
            raise DataError(
                f"data root {root} has no {dataset} files (looked for {root / folder / 'raw'}/"
                "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz])"
            )
        return DataSource(root, "data-root")
    searched = ["--data-root/data.root (not given)"]
    env = os.environ.get(ENV_VAR)
    if env:
        root = Path(env).expanduser()
        if _has_dataset(root, dataset):
            return DataSource(root, "env")
        searched.append(f"${ENV_VAR}={root} (no {folder}/raw files)")
    else:
        searched.append(f"${ENV_VAR} (unset)")
    if download:
        return DataSource(_download(dataset), "download")
    searched.append("torchvision download (data.download is false)")
    if allow_embedded and _has_dataset(EMBEDDED_ROOT, dataset):
        return DataSource(EMBEDDED_ROOT, "embedded")
    searched.append("embedded subset (" + ("not allowed by data.allow_embedded: false" if not allow_embedded
                                           else "missing from this installation") + ")")
    raise DataError(f"no {dataset} data found; searched: " + "; ".join(searched))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_split(source: DataSource, dataset: str, split: str) -> Split:
    check_dataset_name(dataset)
    paths = {}
    for part in ("images", "labels"):
        path = _find_file(source.root, dataset, _STEMS[(split, part)])
        if path is None:
            raise DataError(f"{dataset} {split} {part} missing under {source.root}")
        paths[part] = path
    images = read_idx(paths["images"])
    labels = read_idx(paths["labels"]).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataError(f"{dataset} {split} under {source.root}: images {images.shape} do not match "
                        f"labels {labels.shape}")
    if labels.size and labels.max() > 9:
        raise DataError(f"{dataset} {split} under {source.root}: label {labels.max()} outside 0..9")
    checks = {paths[part].name: verify(dataset, _STEMS[(split, part)], split, len(labels), encode_idx(array),
                                       str(paths[part]))
              for part, array in (("images", images), ("labels", labels.astype(np.uint8)))}
    return Split(dataset, split, images, labels, {p.name: _sha256(p) for p in paths.values()}, checks)
