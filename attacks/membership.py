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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from attacks.latent_fit import _pairwise_sq, fit_latents
from attacks.shared_artifacts import generate


@dataclass
class MembershipGame:
    """Members: a seeded random subset of a client's training records; non-members: as many records
    of the same client's reserved held-out pool (same distribution, never trained on)."""

    client: int
    member_ids: np.ndarray
    nonmember_ids: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        return np.r_[np.ones(len(self.member_ids), bool), np.zeros(len(self.nonmember_ids), bool)]

    @property
    def ids(self) -> np.ndarray:
        return np.r_[self.member_ids, self.nonmember_ids]


def membership_game(client_record: dict, size: int, seed: int) -> MembershipGame:
    """From a partition.json client entry; ``size`` members and ``size`` non-members at most (fewer if
    the held-out pool is smaller: the game stays balanced)."""
    train = np.asarray(client_record["train_ids"], np.int64)
    hold = np.asarray(client_record["holdout_ids"], np.int64)
    n = min(size, len(train), len(hold))
    rng = np.random.default_rng([seed, client_record["client"], 0x313])
    return MembershipGame(client_record["client"], np.sort(rng.choice(train, n, replace=False)),
                          np.sort(rng.choice(hold, n, replace=False)))


class LatentFitAttack:
    name = "white_box_latent_fit"

    def __init__(self, lam: float = 0.01, init: int = 1024, restarts: int = 3, steps: int = 60):
        self.options = dict(lam=lam, init=init, restarts=restarts, steps=steps)

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
        self.generated = generate(decoder, latent_dim, self.samples, generator)
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
