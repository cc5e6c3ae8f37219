"""IDX reading, data-source resolution and the embedded subset."""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from federation.data import embedded_subset
from federation.data.idx import encode_idx, parse_idx, read_idx
from federation.data.sources import (
    DATASETS, EMBEDDED_ROOT, ENV_VAR, DataSource, load_split, resolve_source)
from federation.errors import DataError

STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte")


def _images(n=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def write_fake_dataset(root: Path, dataset: str, n_train=20, n_test=10, gz=True) -> Path:
    """A tiny but valid dataset in torchvision's layout under ``root``."""
    raw = root / DATASETS[dataset] / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        for part, arr in (("images-idx3", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                          ("labels-idx1", labels)):
            blob = encode_idx(arr)
            name = f"{prefix}-{part}-ubyte"
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(blob))
            else:
                (raw / name).write_bytes(blob)
    return root


# ------------------------------------------------------------------------------------------- IDX
@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.uint8, st.one_of(
    st.tuples(st.integers(0, 50)),
    st.tuples(st.integers(0, 5), st.integers(1, 30), st.integers(1, 30)))))
def test_idx_round_trip(array):
    blob = encode_idx(array)
    assert int.from_bytes(blob[:4], "big") == (0x0800 | array.ndim)
    assert len(blob) == 4 + 4 * array.ndim + array.size
    back = parse_idx(blob)
    assert back.dtype == np.uint8
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_from_file(tmp_path, gz):
    images = _images()
    path = tmp_path / ("x-idx3-ubyte.gz" if gz else "x-idx3-ubyte")
    path.write_bytes(gzip.compress(encode_idx(images)) if gz else encode_idx(images))
    np.testing.assert_array_equal(read_idx(path), images)


@pytest.mark.parametrize("cut", [1, 100, 28 * 28])
def test_truncated_idx_body_raises_clear_error(tmp_path, cut):
    blob = encode_idx(_images())[:-cut]
    with pytest.raises(DataError, match=r"truncated or corrupted"):
        parse_idx(blob, "images.idx")
    path = tmp_path / "images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(blob))
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert str(path) in str(err.value) and "truncated" in str(err.value)


def test_idx_with_trailing_garbage_raises():
    with pytest.raises(DataError, match="IDX body has"):
        parse_idx(encode_idx(_images()) + b"\x00\x01")


@pytest.mark.parametrize("blob", [b"", b"\x00\x00", b"\x00\x00\x08\x03\x00\x00\x00\x06"])
def test_truncated_idx_header_raises(blob):
    with pytest.raises(DataError, match="truncated IDX header"):
        parse_idx(blob, "hdr")


@pytest.mark.parametrize("magic", [0x00000803 ^ 0x01000000, 0x00000D03, 0x00000804, 0x1F8B0800, 0])
def test_bad_magic_raises(magic):
    blob = bytearray(encode_idx(_images()))
    blob[:4] = magic.to_bytes(4, "big")
    with pytest.raises(DataError, match="not an unsigned-byte IDX file"):
        parse_idx(bytes(blob), "bad")


def test_truncated_gzip_raises_data_error(tmp_path):
    blob = gzip.compress(encode_idx(_images(200)))
    path = tmp_path / "t.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"cannot read IDX file .*t\.gz"):
        read_idx(path)


def test_gzip_crc_mismatch_raises_data_error(tmp_path):
    blob = bytearray(gzip.compress(encode_idx(_images(50)), compresslevel=0))  # stored: flips hit data
    blob[len(blob) // 2] ^= 0xFF
    path = tmp_path / "crc.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(path)


def test_not_gzip_with_gz_suffix_raises_data_error(tmp_path):
    path = tmp_path / "plain.gz"
    path.write_bytes(encode_idx(_images()))
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(path)


def test_corrupted_deflate_stream_raises_data_error(tmp_path):
    # byte 20 of the shipped MNIST t10k images lies in the deflate block header: flipping it makes
    # zlib fail ("invalid literal/lengths set") before any CRC check
    blob = bytearray((EMBEDDED_ROOT / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").read_bytes())
    blob[20] ^= 0xFF
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(path)


def test_load_split_rejects_mismatched_images_and_labels(tmp_path):
    root = write_fake_dataset(tmp_path, "mnist")
    raw = root / "MNIST" / "raw"
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(encode_idx(np.zeros(7, np.uint8))))
    with pytest.raises(DataError, match="do not match"):
        load_split(DataSource(root, "data-root"), "mnist", "test")
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(encode_idx(np.full(10, 11, np.uint8))))
    with pytest.raises(DataError, match="outside 0..9"):
        load_split(DataSource(root, "data-root"), "mnist", "test")


# ------------------------------------------------------------------------------ source resolution
@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.mark.parametrize("gz", [True, False])
def test_explicit_root_wins_over_env_and_embedded(tmp_path, monkeypatch, gz):
    explicit = write_fake_dataset(tmp_path / "explicit", "mnist", gz=gz)
    env = write_fake_dataset(tmp_path / "env", "mnist")
    monkeypatch.setenv(ENV_VAR, str(env))
    src = resolve_source("mnist", data_root=explicit)
    assert src == DataSource(explicit, "data-root")
    split = load_split(src, "mnist", "train")
    assert len(split) == 20 and split.images.shape == (20, 28, 28)
    assert set(split.files) == {f"train-images-idx3-ubyte{'.gz' if gz else ''}",
                                f"train-labels-idx1-ubyte{'.gz' if gz else ''}"}


def test_env_wins_over_embedded(tmp_path, monkeypatch):
    env = write_fake_dataset(tmp_path / "env", "fashion_mnist")
    monkeypatch.setenv(ENV_VAR, str(env))
    assert resolve_source("fashion_mnist") == DataSource(env, "env")
    # the env root has no MNIST: fall through to the embedded subset
    assert resolve_source("mnist") == DataSource(EMBEDDED_ROOT, "embedded")


def test_embedded_is_the_last_resort(no_env):
    for dataset in DATASETS:
        assert resolve_source(dataset) == DataSource(EMBEDDED_ROOT, "embedded")


def test_explicit_missing_root_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(write_fake_dataset(tmp_path / "env", "mnist")))
    missing = tmp_path / "does-not-exist"
    with pytest.raises(DataError) as err:
        resolve_source("mnist", data_root=missing)  # no silent fallback to env or embedded
    assert str(missing) in str(err.value)
    incomplete = tmp_path / "incomplete"
    write_fake_dataset(incomplete, "mnist")
    (incomplete / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=str(incomplete)):
        resolve_source("mnist", data_root=incomplete)


def test_nothing_found_names_every_place_searched(tmp_path, monkeypatch, no_env):
    with pytest.raises(DataError) as err:
        resolve_source("mnist", allow_embedded=False)
    msg = str(err.value)
    for place in ("data-root", ENV_VAR, "download", "embedded"):
        assert place in msg, (place, msg)
    empty = tmp_path / "empty-env"
    empty.mkdir()
    monkeypatch.setenv(ENV_VAR, str(empty))
    with pytest.raises(DataError) as err:
        resolve_source("fashion_mnist", allow_embedded=False)
    msg = str(err.value)
    for place in ("data-root", ENV_VAR, str(empty), "download", "embedded"):
        assert place in msg, (place, msg)


def test_unknown_dataset_is_data_error():
    with pytest.raises(DataError, match="unknown dataset 'cifar10'"):
        resolve_source("cifar10")


# -------------------------------------------------------------------------------- embedded subset
@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_embedded_subset_is_stratified(dataset):
    src = DataSource(EMBEDDED_ROOT, "embedded")
    manifest = json.loads((EMBEDDED_ROOT / "subset_indices.json").read_text())
    for split, per_class in (("train", 300), ("test", 100)):
        data = load_split(src, dataset, split)
        assert data.images.shape == (10 * per_class, 28, 28)
        assert np.bincount(data.labels, minlength=10).tolist() == [per_class] * 10
        entry = manifest[f"{dataset}/{split}"]
        assert entry["per_class"] == per_class
        idx = np.array(entry["source_indices"])
        assert len(idx) == 10 * per_class and np.all(np.diff(idx) > 0)  # sorted, no repeats
        assert idx.min() >= 0 and idx.max() < (60000 if split == "train" else 10000)
        assert data.images.std() > 0  # real images, not placeholders


def test_embedded_subset_differs_between_datasets():
    a = load_split(DataSource(EMBEDDED_ROOT, "embedded"), "mnist", "test")
    b = load_split(DataSource(EMBEDDED_ROOT, "embedded"), "fashion_mnist", "test")
    assert not np.array_equal(a.images, b.images)


# ------------------------------------------------------------------------------------- full data
FULL_MD5 = {
    "MNIST/raw/train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "MNIST/raw/train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "MNIST/raw/t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "MNIST/raw/t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    "FashionMNIST/raw/train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "FashionMNIST/raw/train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "FashionMNIST/raw/t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "FashionMNIST/raw/t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}


@pytest.mark.full_data
@pytest.mark.parametrize("name", sorted(FULL_MD5))
def test_full_files_match_published_md5(full_data_root, name):
    gz, raw = full_data_root / f"{name}.gz", full_data_root / name
    blob = gzip.decompress(gz.read_bytes()) if gz.is_file() else raw.read_bytes()
    assert hashlib.md5(blob).hexdigest() == FULL_MD5[name]


@pytest.mark.full_data
def test_rebuilding_embedded_subset_is_byte_identical(full_data_root, tmp_path):
    out = tmp_path / "rebuilt"
    manifest = embedded_subset.build(full_data_root, out)
    shipped = sorted(p.relative_to(EMBEDDED_ROOT) for p in EMBEDDED_ROOT.glob("*/raw/*.gz"))
    rebuilt = sorted(p.relative_to(out) for p in out.glob("*/raw/*.gz"))
    assert len(shipped) == 8 and rebuilt == shipped
    for rel in shipped:
        assert (out / rel).read_bytes() == (EMBEDDED_ROOT / rel).read_bytes(), rel
    assert json.loads((out / "subset_indices.json").read_text()) == \
        json.loads((EMBEDDED_ROOT / "subset_indices.json").read_text())
    # every embedded record traces back to its source row
    full = load_split(DataSource(full_data_root, "data-root"), "mnist", "test")
    emb = load_split(DataSource(EMBEDDED_ROOT, "embedded"), "mnist", "test")
    idx = np.array(manifest["mnist/test"]["source_indices"])
    np.testing.assert_array_equal(emb.images, full.images[idx])
    np.testing.assert_array_equal(emb.labels, full.labels[idx])


# ------------------------------------------------------------------------------ known checksums
def _standard_size_root(tmp_path):
    """A data root whose MNIST test files have the standard size but not the standard content."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.zeros((10000, 28, 28), np.uint8)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(encode_idx(images), compresslevel=1))
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(encode_idx(np.zeros(10000, np.uint8))))
    return tmp_path


def test_standard_size_file_that_is_not_the_standard_one_is_refused(tmp_path):
    root = _standard_size_root(tmp_path)
    with pytest.raises(DataError, match="is not the published 2646ac647ad5339dbf082846283269ea"):
        load_split(DataSource(root, "data-root"), "mnist", "test")


def test_other_sizes_are_read_but_recorded_unverified(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-images-idx3-ubyte").write_bytes(encode_idx(np.zeros((12, 28, 28), np.uint8)))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(encode_idx(np.zeros(12, np.uint8)))
    split = load_split(DataSource(tmp_path, "data-root"), "mnist", "test")
    assert set(split.checksums.values()) == {"unverified (12 rows, not the standard size)"}


@pytest.mark.full_data
def test_full_files_are_verified_on_load(full_data_root):
    split = load_split(resolve_source("fashion_mnist", full_data_root), "fashion_mnist", "test")
    assert set(split.checksums.values()) == {"verified"}


@pytest.mark.full_data
def test_a_flipped_byte_in_a_full_file_is_refused(full_data_root, tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    src = full_data_root / "FashionMNIST" / "raw"
    blob = bytearray(gzip.decompress((src / "t10k-images-idx3-ubyte.gz").read_bytes()))
    blob[5000] ^= 0x01  # one pixel, one bit: size and IDX header intact
    (raw / "t10k-images-idx3-ubyte").write_bytes(bytes(blob))
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes((src / "t10k-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(DataError, match="corrupted or not the standard one"):
        load_split(DataSource(tmp_path, "data-root"), "fashion_mnist", "test")
