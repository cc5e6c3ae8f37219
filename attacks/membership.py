"""Membership inference against one shared decoder, behind one small API:

    attack.fit(decoder, latent_dim, generator) -> attack      (what the adversary prepares once)
    attack.score(records) -> np.ndarray                       (higher means "member")

* ``LatentFitAttack``: white-box, minus the latent-fit objective (the decoder-only analogue of
  GAN-Leaks' white-box attack).
* ``MonteCarloAttack``: Hilprecht et al.'s Monte-Carlo attack, the fraction of generated samples that
  fall in the epsilon-ball around a record, epsilon being the median nearest-sample distance of the
  candidate set (the median heuristic).
* ``NearestSampleAttack``: black-box, minus the distance to the nearest generated sample.
* ``ReferenceCalibrated``: any of the above minus the same score under a reference decoder trained
  with the same recipe on population data disjoint from the client (LiRA/RMIA-style calibration of
  per-record difficulty).

``membership_scores`` runs all of them on one decoder, doing each shared computation once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from attacks.latent_fit import _pairwise_sq, fit_latents
from attacks.shared_artifacts import generate


@dataclass
class MembershipGame:
    """Members: a seeded random subset of a client's training records; non-members: records of the same
    client's reserved held-out pool (same distribution, never trained on), class-matched: in every class
    exactly as many non-members as members."""

    client: int
    member_ids: np.ndarray
    nonmember_ids: np.ndarray
    member_counts: dict[int, int] = field(default_factory=dict)  # class -> members of that class
    nonmember_counts: dict[int, int] = field(default_factory=dict)  # class -> non-members (equal to the above)
    shrunk: dict[int, dict] = field(default_factory=dict)  # class -> {drawn, holdout, kept} where cut

    @property
    def labels(self) -> np.ndarray:
        return np.r_[np.ones(len(self.member_ids), bool), np.zeros(len(self.nonmember_ids), bool)]

    @property
    def ids(self) -> np.ndarray:
        return np.r_[self.member_ids, self.nonmember_ids]

    def to_json(self) -> dict:
        return {"members_per_class": {str(c): n for c, n in self.member_counts.items()},
                "nonmembers_per_class": {str(c): n for c, n in self.nonmember_counts.items()},
                "shrunk_classes": {str(c): v for c, v in self.shrunk.items()}}


def membership_game(client_record: dict, size: int, seed: int, labels: np.ndarray) -> MembershipGame:
    """From a partition.json client entry and the class labels of the split its ids index.

    Up to ``size`` members are drawn at random from the client's training records, so their classes
    follow the client's own (possibly imbalanced) class proportions. For every class, as many
    non-members of that class are drawn from the client's held-out records of that class: a score
    that merely prefers one class cannot separate the two groups. Where a class's held-out records are
    fewer than its members, that class's members are cut at random to the held-out count, and the
    cut is recorded in ``shrunk``."""
    labels = np.asarray(labels)
    train = np.asarray(client_record["train_ids"], np.int64)
    hold = np.asarray(client_record["holdout_ids"], np.int64)
    rng = np.random.default_rng([seed, client_record["client"], 0x313])
    drawn = rng.choice(train, min(size, len(train)), replace=False)
    members, nonmembers, m_counts, n_counts, shrunk = [], [], {}, {}, {}
    for c in np.unique(labels[drawn]).tolist():
        mine, pool = drawn[labels[drawn] == c], hold[labels[hold] == c]
        k = min(len(mine), len(pool))
        if k < len(mine):
            shrunk[c] = {"drawn": int(len(mine)), "holdout": int(len(pool)), "kept": int(k)}
            mine = rng.choice(mine, k, replace=False)
        members.append(mine)
        nonmembers.append(rng.choice(pool, k, replace=False))
        m_counts[c] = n_counts[c] = int(k)
    empty = np.zeros(0, np.int64)
    return MembershipGame(client_record["client"], np.sort(np.concatenate(members or [empty])),
                          np.sort(np.concatenate(nonmembers or [empty])), m_counts, n_counts, shrunk)


class LatentFitAttack:
    name = "white_box_latent_fit"

    def __init__(self, lam: float = 0.01, init: int = 1024, restarts: int = 3, steps: int = 60,
                 precision: str = "fp32"):
        self.options = dict(lam=lam, init=init, restarts=restarts, steps=steps, precision=precision)

    def fit(self, decoder: nn.Module, latent_dim: int, generator: torch.Generator) -> "LatentFitAttack":
        self.decoder, self.latent_dim, self.generator = decoder, latent_dim, generator
        return self

    def score(self, records: torch.Tensor) -> np.ndarray:
        fit = fit_latents(self.decoder, records, self.latent_dim, self.generator, **self.options)
        return (-fit.objective).numpy().astype(np.float64)


class _GeneratedSampleAttack:
    def __init__(self, samples: int = 10000, chunk: int = 256):
        self.samples, self.chunk = samples, chunk

    def fit(self, decoder: nn.Module, latent_dim: int, generator: torch.Generator):
        return self.fit_samples(generate(decoder, latent_dim, self.samples, generator))

    def fit_samples(self, generated: torch.Tensor):
        """Use samples already generated from the decoder (flattened, as ``generate`` returns them)."""
        self.generated = generated
        return self

    def _distances(self, records: torch.Tensor):
        """Yields (chunk of records, distances (chunk, samples))."""
        x = records.flatten(1).float()
        for i in range(0, len(x), self.chunk):
            yield _pairwise_sq(x[i:i + self.chunk], self.generated).sqrt_()


class NearestSampleAttack(_GeneratedSampleAttack):
    name = "nearest_generated_sample"

    def score(self, records: torch.Tensor) -> np.ndarray:
        return -torch.cat([d.min(1).values for d in self._distances(records)]).numpy().astype(np.float64)


class MonteCarloAttack(_GeneratedSampleAttack):
    name = "monte_carlo"

    def score(self, records: torch.Tensor) -> np.ndarray:
        dists = list(self._distances(records))
        radius = torch.cat([d.min(1).values for d in dists]).median()
        self.radius = float(radius)
        return torch.cat([(d <= radius).double().mean(1) for d in dists]).numpy()


class ReferenceCalibrated:
    """score(x) under the target decoder minus score(x) under a reference decoder."""

    def __init__(self, make_attack, reference: nn.Module):
        self.target_attack, self.reference_attack = make_attack(), make_attack()
        self.reference = reference
        self.name = f"{self.target_attack.name}_calibrated"

    def fit(self, decoder: nn.Module, latent_dim: int, generator: torch.Generator) -> "ReferenceCalibrated":
        self.target_attack.fit(decoder, latent_dim, generator)
        self.reference_attack.fit(self.reference, latent_dim, generator)
        return self

    def score(self, records: torch.Tensor) -> np.ndarray:
        return self.target_attack.score(records) - self.reference_attack.score(records)


def membership_scores(decoder: nn.Module, latent_dim: int, records: torch.Tensor, make_generator, *,
                      latent_options: dict, samples: int, reference: nn.Module | None = None) -> dict[str, np.ndarray]:
    """Every attack's scores on ``records``: white-box latent fit, Monte-Carlo, nearest generated sample,
    and (with a ``reference``) the calibrated latent fit and Monte-Carlo.

    The same values as each attack run on its own with a fresh ``make_generator()``, but the target's
    latent fit and its generated-sample set are computed once and shared by every attack that uses them
    (a calibrated attack draws its reference's bank or samples from the generator after the target's, as
    ``ReferenceCalibrated`` does)."""
    fit_generator, sample_generator = make_generator(), make_generator()
    latent = LatentFitAttack(**latent_options).fit(decoder, latent_dim, fit_generator).score(records)
    generated = generate(decoder, latent_dim, samples, sample_generator)
    mc = MonteCarloAttack(samples).fit_samples(generated).score(records)
    out = {LatentFitAttack.name: latent, MonteCarloAttack.name: mc,
           NearestSampleAttack.name: NearestSampleAttack(samples).fit_samples(generated).score(records)}
    if reference is not None:
        ref_latent = LatentFitAttack(**latent_options).fit(reference, latent_dim, fit_generator).score(records)
        ref_generated = generate(reference, latent_dim, samples, sample_generator)
        ref_mc = MonteCarloAttack(samples).fit_samples(ref_generated).score(records)
        out[f"{LatentFitAttack.name}_calibrated"] = latent - ref_latent
        out[f"{MonteCarloAttack.name}_calibrated"] = mc - ref_mc
    return out
