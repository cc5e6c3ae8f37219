"""Split a dataset across clients: class-disjoint or Dirichlet(alpha), with held-out pools that
no model trains on, and cross-domain outliers tracked by index.

Record ids are row indices into the train split of their dataset (the main dataset for client
records and held-out pools, the outlier dataset for outliers and their controls).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from federation.errors import ConfigError

NUM_CLASSES = 10


@dataclass
class OutlierSpec:
    count: int = 0
    client: int = 0
    holdout: int = 0  # never-seen items of the outlier source: controls / non-members
    source: str | None = None  # default: the other dataset


@dataclass
class CanarySpec:
    """One-run audit canaries (Steinke, Nasr, Jagielski 2023): ``count`` never-used items of the outlier
    source, each inserted into ``client``'s training set independently with probability 1/2."""

    count: int = 0
    client: int = 0


@dataclass
class PartitionSpec:
    scheme: str = "class_disjoint"  # class_disjoint | dirichlet
    client_classes: list = field(default_factory=lambda: [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]])
    num_clients: int = 5  # dirichlet only
    alpha: float = 0.5  # dirichlet only
    samples_per_class: int = 6000
    holdout_per_class: int = 500
    outliers: OutlierSpec = field(default_factory=OutlierSpec)
    canaries: CanarySpec = field(default_factory=CanarySpec)

    @property
    def n_clients(self) -> int:
        return len(self.client_classes) if self.scheme == "class_disjoint" else self.num_clients

    def validate(self) -> None:
        if self.scheme not in ("class_disjoint", "dirichlet"):
            raise ConfigError(f"partition.scheme must be class_disjoint or dirichlet, not {self.scheme!r}")
        if self.n_clients > NUM_CLASSES:
            raise ConfigError(f"more clients ({self.n_clients}) than classes ({NUM_CLASSES})")
        if self.n_clients < 1:
            raise ConfigError("partition needs at least one client")
        if self.scheme == "class_disjoint":
            seen: dict[int, int] = {}
            for k, classes in enumerate(self.client_classes):
                if not isinstance(classes, list) or not classes:
                    raise ConfigError(f"partition.client_classes[{k}] must be a non-empty list of classes")
                for c in classes:
                    if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < NUM_CLASSES:
                        raise ConfigError(f"partition.client_classes[{k}]: class {c!r} is out of range 0..9")
                    if c in seen:
                        raise ConfigError(f"partition.client_classes: class {c} is given to clients {seen[c]} and {k}")
                    seen[c] = k
        elif not self.alpha > 0:
            raise ConfigError(f"partition.alpha must be > 0, got {self.alpha}")
        if self.samples_per_class <= 0:
            raise ConfigError(f"partition.samples_per_class must be > 0, got {self.samples_per_class}")
        if self.holdout_per_class < 0:
            raise ConfigError(f"partition.holdout_per_class must be >= 0, got {self.holdout_per_class}")
        o = self.outliers
        if o.count < 0 or o.holdout < 0:
            raise ConfigError("partition.outliers.count and .holdout must be >= 0")
        if not 0 <= o.client < self.n_clients:
            raise ConfigError(f"partition.outliers.client {o.client} is not a client (0..{self.n_clients - 1})")
        c = self.canaries
        if c.count < 0 or c.count == 1:
            raise ConfigError(f"partition.canaries.count must be 0 (off) or at least 2, got {c.count}")
        if not 0 <= c.client < self.n_clients:
            raise ConfigError(f"partition.canaries.client {c.client} is not a client (0..{self.n_clients - 1})")


@dataclass
class ClientShard:
    client: int
    classes: list[int]
    train_ids: np.ndarray  # into the main dataset's train split
    outlier_ids: np.ndarray  # into the outlier dataset's train split
    holdout_ids: np.ndarray  # main dataset, the client's distribution, never trained on
    class_counts: dict[int, int]
    canary_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # outlier source, included canaries

    def to_json(self) -> dict:
        return {"client": self.client, "classes": self.classes,
                "class_counts": {str(c): n for c, n in sorted(self.class_counts.items())},
                "n_train": int(len(self.train_ids) + len(self.outlier_ids) + len(self.canary_ids)),
                "train_ids": self.train_ids.tolist(), "outlier_ids": self.outlier_ids.tolist(),
                "holdout_ids": self.holdout_ids.tolist()}


@dataclass
class Partition:
    dataset: str
    outlier_dataset: str
    scheme: str
    shards: list[ClientShard]
    outlier_control_ids: np.ndarray  # outlier source, never trained on
    seed: int
    canary_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # all m candidates
    canary_included: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # the coin flips
    canary_client: int | None = None

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "outlier_dataset": self.outlier_dataset, "scheme": self.scheme,
                "seed": self.seed, "id_space": "row index into the train split of the named dataset",
                "test_split": "the dataset's full test split (IID, shared by all metrics)",
                "clients": [s.to_json() for s in self.shards],
                "outliers": {"dataset": self.outlier_dataset,
                             "client": next((s.client for s in self.shards if len(s.outlier_ids)), None),
                             "ids": np.concatenate([s.outlier_ids for s in self.shards]).tolist(),
                             "control_ids": self.outlier_control_ids.tolist()},
                "canaries": {"dataset": self.outlier_dataset, "client": self.canary_client,
                             "ids": self.canary_ids.tolist(), "included": self.canary_included.tolist(),
                             "inclusion_probability": 0.5}}


def make_partition(spec: PartitionSpec, labels: np.ndarray, outlier_labels: np.ndarray,
                   dataset: str, outlier_dataset: str, seed: int) -> Partition:
    """Assign record ids to clients. Held-out pools are taken first from each class."""
    spec.validate()
    rng = np.random.default_rng([seed, 0xDA7A])
    k = spec.n_clients
    train: list[list[np.ndarray]] = [[] for _ in range(k)]
    hold: list[list[np.ndarray]] = [[] for _ in range(k)]
    counts: list[dict[int, int]] = [{} for _ in range(k)]
    owner = {c: i for i, cs in enumerate(spec.client_classes) for c in cs} if spec.scheme == "class_disjoint" else {}
    for c in range(NUM_CLASSES):
        if spec.scheme == "class_disjoint" and c not in owner:
            continue
        pool = rng.permutation(np.flatnonzero(labels == c))
        if len(pool) <= spec.holdout_per_class:
            raise ConfigError(f"class {c} of {dataset} has {len(pool)} training images; cannot reserve a "
                              f"held-out pool of {spec.holdout_per_class} and still train on it")
        held, rest = pool[:spec.holdout_per_class], pool[spec.holdout_per_class:][:spec.samples_per_class]
        if spec.scheme == "class_disjoint":
            shares = np.zeros(k)
            shares[owner[c]] = 1.0
        else:
            shares = rng.dirichlet(np.full(k, spec.alpha))
        for i, (tr, ho) in enumerate(zip(_split(rest, shares), _split(held, shares))):
            if len(tr):
                train[i].append(tr)
                counts[i][c] = len(tr)
            if len(ho):
                hold[i].append(ho)
    o = spec.outliers
    opool = rng.permutation(len(outlier_labels))
    m = spec.canaries.count
    if o.count + o.holdout + m > len(opool):
        raise ConfigError(f"{outlier_dataset} has {len(opool)} training images; cannot take {o.count} outliers, "
                          f"{o.holdout} controls and {m} canaries")
    controls, outliers = opool[:o.holdout], opool[o.holdout:o.holdout + o.count]
    canaries = opool[o.holdout + o.count:o.holdout + o.count + m]
    included = np.random.default_rng([seed, 0xCA7A]).random(m) < 0.5  # own stream: other draws do not move
    shards = []
    for i in range(k):
        ids = np.sort(np.concatenate(train[i])) if train[i] else np.zeros(0, np.int64)
        if not len(ids):
            raise ConfigError(f"client {i} received no training records (try a larger partition.alpha)")
        shards.append(ClientShard(
            client=i, classes=sorted(counts[i]), train_ids=ids,
            outlier_ids=np.sort(outliers) if i == o.client else np.zeros(0, np.int64),
            holdout_ids=np.sort(np.concatenate(hold[i])) if hold[i] else np.zeros(0, np.int64),
            class_counts=counts[i],
            canary_ids=np.sort(canaries[included]) if i == spec.canaries.client else np.zeros(0, np.int64)))
    return Partition(dataset, outlier_dataset, spec.scheme, shards, np.sort(controls), seed,
                     canaries, included, spec.canaries.client if m else None)


def _split(ids: np.ndarray, shares: np.ndarray) -> list[np.ndarray]:
    cuts = np.floor(np.cumsum(shares)[:-1] * len(ids) + 1e-9).astype(int)
    return np.split(ids, cuts)
