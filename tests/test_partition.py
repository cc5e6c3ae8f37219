"""Partitioning: class-disjoint and Dirichlet splits, held-out pools and outliers."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from federation.data.idx import read_idx
from federation.data.partition import CanarySpec, OutlierSpec, PartitionSpec, make_partition
from federation.data.sources import EMBEDDED_ROOT, DataSource, load_split
from federation.errors import ConfigError

PAPER_CLASSES = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


@pytest.fixture(scope="module")
def embedded_labels():
    src = DataSource(EMBEDDED_ROOT, "embedded")
    return (load_split(src, "mnist", "train").labels, load_split(src, "fashion_mnist", "train").labels)


@pytest.fixture(scope="module")
def full_labels(full_data_root):
    return (read_idx(full_data_root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz").astype(np.int64),
            read_idx(full_data_root / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte.gz").astype(np.int64))


def check_partition(part, spec: PartitionSpec, labels: np.ndarray, outlier_labels: np.ndarray) -> None:
    """Every invariant a partition must satisfy, whatever the scheme."""
    shards = part.shards
    assert len(shards) == spec.n_clients
    assert [s.client for s in shards] == list(range(spec.n_clients))
    all_train = [set(s.train_ids.tolist()) for s in shards]
    all_hold = [set(s.holdout_ids.tolist()) for s in shards]
    for s, tr in zip(shards, all_train):
        assert len(tr) == len(s.train_ids), "duplicate ids inside a client"
        assert np.all(np.diff(s.train_ids) > 0)
    # clients' training records are pairwise disjoint; held-out ids never trained on by anyone
    for a, b in itertools.combinations(range(len(shards)), 2):
        assert not all_train[a] & all_train[b], (a, b)
        assert not all_hold[a] & all_hold[b], (a, b)
    union_train = set().union(*all_train)
    union_hold = set().union(*all_hold)
    assert not union_train & union_hold
    available = np.bincount(labels, minlength=10)
    for s in shards:
        own = labels[s.train_ids]
        assert set(np.unique(own).tolist()) == set(s.classes)
        assert {c: int((own == c).sum()) for c in s.classes} == s.class_counts
        if len(s.holdout_ids):
            assert set(np.unique(labels[s.holdout_ids]).tolist()) <= set(s.classes) | (
                set(range(10)) if spec.scheme == "dirichlet" else set())
    # class totals: min(samples_per_class, available - holdout), held-out pools exactly holdout_per_class
    used = {c for s in shards for c in s.classes} | (
        {c for cs in spec.client_classes for c in cs} if spec.scheme == "class_disjoint" else set(range(10)))
    train_labels = labels[sorted(union_train)]
    hold_labels = labels[sorted(union_hold)]
    for c in used:
        assert int((train_labels == c).sum()) == min(spec.samples_per_class, available[c] - spec.holdout_per_class)
        assert int((hold_labels == c).sum()) == spec.holdout_per_class
    # outliers: only on the target client, disjoint from controls, valid rows of the outlier dataset
    o = spec.outliers
    for s in shards:
        if s.client == o.client:
            assert len(s.outlier_ids) == o.count
        else:
            assert len(s.outlier_ids) == 0
    out_ids = np.concatenate([s.outlier_ids for s in shards])
    ctrl = part.outlier_control_ids
    assert len(ctrl) == o.holdout
    assert len(set(out_ids.tolist())) == len(out_ids) and len(set(ctrl.tolist())) == len(ctrl)
    assert not set(out_ids.tolist()) & set(ctrl.tolist())
    for ids in (out_ids, ctrl):
        assert ids.dtype.kind == "i"
        assert np.all((ids >= 0) & (ids < len(outlier_labels)))


# ------------------------------------------------------------------------------- class-disjoint
def test_class_disjoint_on_embedded(embedded_labels):
    labels, olabels = embedded_labels
    spec = PartitionSpec(client_classes=PAPER_CLASSES, samples_per_class=250, holdout_per_class=50,
                         outliers=OutlierSpec(count=25, client=0, holdout=50))
    part = make_partition(spec, labels, olabels, "mnist", "fashion_mnist", seed=0)
    check_partition(part, spec, labels, olabels)
    for s, classes in zip(part.shards, PAPER_CLASSES):
        assert s.classes == classes
        assert s.class_counts == {c: 250 for c in classes}
        assert set(labels[s.holdout_ids].tolist()) == set(classes)
        assert len(s.holdout_ids) == 50 * len(classes)
    assert len(part.shards[0].outlier_ids) == 25
    js = part.to_json()
    assert js["outliers"]["client"] == 0 and len(js["outliers"]["ids"]) == 25
    assert js["clients"][0]["n_train"] == 525


def test_class_disjoint_takes_all_that_is_left(embedded_labels):
    labels, olabels = embedded_labels
    spec = PartitionSpec(client_classes=[[3], [7, 1]], samples_per_class=10_000, holdout_per_class=40)
    part = make_partition(spec, labels, olabels, "mnist", "fashion_mnist", seed=3)
    check_partition(part, spec, labels, olabels)
    assert part.shards[0].class_counts == {3: 260}
    assert part.shards[1].class_counts == {1: 260, 7: 260}
    assert part.shards[1].classes == [1, 7]


@pytest.mark.full_data
def test_class_disjoint_on_full_mnist(full_labels):
    labels, olabels = full_labels
    spec = PartitionSpec(client_classes=PAPER_CLASSES, samples_per_class=6000, holdout_per_class=500,
                         outliers=OutlierSpec(count=600, client=0, holdout=500))
    part = make_partition(spec, labels, olabels, "mnist", "fashion_mnist", seed=0)
    check_partition(part, spec, labels, olabels)
    available = np.bincount(labels, minlength=10)
    assert available[5] == 5421
    assert part.shards[2].class_counts[5] == 4921  # 5421 - 500: recorded, not padded
    assert part.shards[0].class_counts[1] == 6000  # 6742 available: capped at samples_per_class
    for s, classes in zip(part.shards, PAPER_CLASSES):
        assert s.class_counts == {c: min(6000, int(available[c]) - 500) for c in classes}
        assert len(s.holdout_ids) == 500 * len(classes)
    assert len(part.shards[0].outlier_ids) == 600 and len(part.outlier_control_ids) == 500


def test_partition_is_deterministic_and_seed_dependent(embedded_labels):
    labels, olabels = embedded_labels
    spec = PartitionSpec(samples_per_class=100, holdout_per_class=30, outliers=OutlierSpec(count=20, holdout=20))

    def ids(seed):
        p = make_partition(spec, labels, olabels, "mnist", "fashion_mnist", seed)
        return [(s.train_ids.tolist(), s.holdout_ids.tolist(), s.outlier_ids.tolist()) for s in p.shards], \
            p.outlier_control_ids.tolist()

    assert ids(7) == ids(7)
    a, b = ids(7), ids(8)
    assert a != b
    assert all(x[0] != y[0] for x, y in zip(a[0], b[0]))  # every client's sample changes
    assert a[1] != b[1]


# ------------------------------------------------------------------------------------- Dirichlet
@pytest.mark.parametrize("alpha,seed", [(0.5, 0), (1.0, 1), (100.0, 2)])
def test_dirichlet_partition(embedded_labels, alpha, seed):
    labels, olabels = embedded_labels
    spec = PartitionSpec(scheme="dirichlet", num_clients=4, alpha=alpha, samples_per_class=200,
                         holdout_per_class=50, outliers=OutlierSpec(count=10, client=3, holdout=15))
    part = make_partition(spec, labels, olabels, "mnist", "fashion_mnist", seed)
    check_partition(part, spec, labels, olabels)
    total = sum(len(s.train_ids) for s in part.shards)
    assert total == 10 * 200
    assert sum(len(s.holdout_ids) for s in part.shards) == 10 * 50
    if alpha >= 100:  # nearly uniform shares: every client holds every class
        assert all(len(s.classes) == 10 for s in part.shards)


def test_dirichlet_small_alpha_is_more_skewed(embedded_labels):
    labels, olabels = embedded_labels

    def max_share(alpha):
        spec = PartitionSpec(scheme="dirichlet", num_clients=5, alpha=alpha, samples_per_class=250,
                             holdout_per_class=0)
        part = make_partition(spec, labels, olabels, "mnist", "fashion_mnist", seed=11)
        per_class = np.array([[s.class_counts.get(c, 0) for s in part.shards] for c in range(10)])
        return float((per_class.max(1) / per_class.sum(1)).mean())

    assert max_share(0.1) > max_share(1000.0) + 0.3


# ------------------------------------------------------------------------------------- property
@st.composite
def class_disjoint_cases(draw):
    k = draw(st.integers(1, 10))
    classes = draw(st.permutations(range(10)))
    used = draw(st.integers(k, 10))
    cuts = sorted(draw(st.lists(st.integers(1, used - 1), min_size=k - 1, max_size=k - 1, unique=True))) \
        if k > 1 else []
    groups = [list(classes[a:b]) for a, b in zip([0] + cuts, cuts + [used])]
    per_class = draw(st.lists(st.integers(3, 25), min_size=10, max_size=10))
    holdout = draw(st.integers(0, 2))
    spc = draw(st.integers(1, 30))
    n_out = draw(st.integers(0, 5))
    n_ctrl = draw(st.integers(0, 5))
    client = draw(st.integers(0, k - 1))
    seed = draw(st.integers(0, 2**32 - 1))
    return groups, per_class, holdout, spc, n_out, n_ctrl, client, seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(class_disjoint_cases())
def test_class_disjoint_property(case):
    groups, per_class, holdout, spc, n_out, n_ctrl, client, seed = case
    rng = np.random.default_rng(seed % 1000)
    labels = rng.permutation(np.repeat(np.arange(10), per_class))
    olabels = rng.integers(0, 10, 12)
    spec = PartitionSpec(client_classes=groups, samples_per_class=spc, holdout_per_class=holdout,
                         outliers=OutlierSpec(count=n_out, client=client, holdout=n_ctrl))
    part = make_partition(spec, labels, olabels, "mnist", "fashion_mnist", seed)
    check_partition(part, spec, labels, olabels)
    for s, g in zip(part.shards, groups):
        assert s.classes == sorted(g)
        assert set(labels[s.train_ids].tolist()) <= set(g)
        assert set(labels[s.holdout_ids].tolist()) <= set(g)
        assert len(s.holdout_ids) == holdout * len(g)


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,match", [
    (dict(client_classes=[[0, 1], [1, 2]]), "class 1 is given to clients 0 and 1"),
    (dict(client_classes=[[0, 10]]), "class 10 is out of range"),
    (dict(client_classes=[[-1, 2]]), "class -1 is out of range"),
    (dict(client_classes=[[0], ["3"]]), "out of range"),
    (dict(client_classes=[[0], [True]]), "out of range"),
    (dict(client_classes=[[c] for c in range(10)] + [[0]]), r"more clients \(11\) than classes"),
    (dict(scheme="dirichlet", num_clients=11), r"more clients \(11\) than classes"),
    (dict(client_classes=[]), "at least one client"),
    (dict(client_classes=[[0], []]), "non-empty list"),
    (dict(samples_per_class=0), "samples_per_class must be > 0"),
    (dict(samples_per_class=-3), "samples_per_class must be > 0"),
    (dict(holdout_per_class=-1), "holdout_per_class must be >= 0"),
    (dict(scheme="dirichlet", alpha=0.0), "alpha must be > 0"),
    (dict(scheme="dirichlet", alpha=-0.5), "alpha must be > 0"),
    (dict(scheme="dirichlet", alpha=float("nan")), "alpha must be > 0"),
    (dict(scheme="iid"), "scheme must be"),
    (dict(outliers=OutlierSpec(count=1, client=5)), "outliers.client 5 is not a client"),
    (dict(outliers=OutlierSpec(count=-1)), "must be >= 0"),
    (dict(canaries=CanarySpec(count=-2)), "canaries.count must be 0"),
    (dict(canaries=CanarySpec(count=1)), "at least 2"),
    (dict(canaries=CanarySpec(count=5, client=7)), "canaries.client 7 is not a client"),
])
def test_invalid_specs_raise_config_error(embedded_labels, kwargs, match):
    labels, olabels = embedded_labels
    spec = PartitionSpec(**kwargs)
    with pytest.raises(ConfigError, match=match):
        spec.validate()
    with pytest.raises(ConfigError, match=match):
        make_partition(spec, labels, olabels, "mnist", "fashion_mnist", 0)


def test_holdout_larger_than_class_is_config_error(embedded_labels):
    labels, olabels = embedded_labels
    with pytest.raises(ConfigError, match="class 0 of mnist has 300 training images"):
        make_partition(PartitionSpec(holdout_per_class=300), labels, olabels, "mnist", "fashion_mnist", 0)
    with pytest.raises(ConfigError, match="cannot take"):
        make_partition(PartitionSpec(holdout_per_class=10, outliers=OutlierSpec(count=3000, holdout=1)),
                       labels, olabels, "mnist", "fashion_mnist", 0)


# ------------------------------------------------------------------------------------ canaries
def test_canaries_are_fresh_items_included_by_fair_coins(embedded_labels):
    labels, olabels = embedded_labels
    base = PartitionSpec(holdout_per_class=10, outliers=OutlierSpec(count=40, holdout=30))
    plain = make_partition(base, labels, olabels, "mnist", "fashion_mnist", 3)
    spec = PartitionSpec(holdout_per_class=10, outliers=OutlierSpec(count=40, holdout=30),
                         canaries=CanarySpec(count=400, client=2))
    part = make_partition(spec, labels, olabels, "mnist", "fashion_mnist", 3)
    # adding canaries moves no other draw
    for a, b in zip(plain.shards, part.shards):
        np.testing.assert_array_equal(a.train_ids, b.train_ids)
        np.testing.assert_array_equal(a.outlier_ids, b.outlier_ids)
    np.testing.assert_array_equal(plain.outlier_control_ids, part.outlier_control_ids)
    ids, inc = part.canary_ids, part.canary_included
    assert len(ids) == 400 and len(set(ids.tolist())) == 400
    used = set(part.outlier_control_ids.tolist()) | set(np.concatenate([s.outlier_ids for s in part.shards]).tolist())
    assert not set(ids.tolist()) & used
    # fair coins: 400 flips, |heads - 200| < 4 sd (false alarm about 6e-5)
    assert abs(int(inc.sum()) - 200) < 4 * 10
    assert sorted(part.shards[2].canary_ids.tolist()) == sorted(ids[inc].tolist())
    assert all(len(s.canary_ids) == 0 for s in part.shards if s.client != 2)
    record = part.to_json()["canaries"]
    assert record["client"] == 2 and record["included"] == inc.tolist() and record["inclusion_probability"] == 0.5
