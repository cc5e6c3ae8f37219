"""The auditor's statistics in the white-box self-audit of DP-SGD (``alignfl-audit self-audit``).

Each of m Dirac canaries owns one coordinate of the released (noisy, clipped, summed) gradient that
no other record touches. At step t the auditor reads that coordinate, in units of the clip bound C_t
the step used: y_t = N(0, sigma_g^2) when the canary was not in the batch, and 1 + N(0, sigma_g^2)
when it was (a canary clipped to C_t contributes exactly C_t). An included canary is in each Poisson
batch with probability q, so against an excluded one the likelihood ratio of a step is

    (1 - q) + q * exp((y_t - 1/2) / sigma_g^2),

and the product over the steps is the exact likelihood ratio of the whole trajectory: the optimal
score for "in" versus "out" (:func:`step_log_likelihood_ratio`, summed over the steps).

The auditor guesses "in" for the k canaries with the highest scores and abstains on the rest. It
makes no "out" guesses: with Poisson sampling an included canary that was rarely drawn looks
excluded, so that side is weak (two-sided guesses gained 4% to 19% of the bound in simulations at
m = 20000, epsilon 1 to 8), while on the "in" side every fault that inflates a canary's contribution (too little
noise, a missing clip) shows with certainty.

The ideal auditor (:func:`simulate_scores`) plays the same game against the Gaussian mechanism itself:
the same m, sampling rate, noise multiplier and number of steps, the same score and guesses, and the
one-run bound of :mod:`attacks.empirical_epsilon`. k is chosen on simulations only
(:func:`choose_guesses`), never on the run being audited, so the bound stays valid; the ideal bound
is then reported from fresh simulations (:func:`ideal_epsilon_lb`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attacks.empirical_epsilon import one_run_bound
from federation.errors import ConfigError

# candidate numbers of "in" guesses, as fractions of m
GUESS_FRACTIONS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
_CHUNK = 64  # simulated steps drawn at once


def step_log_likelihood_ratio(y: np.ndarray, sampling_rate: float, noise_multiplier: float) -> np.ndarray:
    """log((1 - q) + q exp((y - 1/2) / sigma^2)) elementwise: one step's log likelihood ratio of
    "included" against "excluded" for a canary whose coordinate reads y (in units of the clip bound)."""
    q, s2 = sampling_rate, noise_multiplier ** 2
    if q >= 1.0:
        return (np.asarray(y, dtype=float) - 0.5) / s2
    return np.logaddexp(np.log1p(-q), np.log(q) + (np.asarray(y, dtype=float) - 0.5) / s2)


def simulate_scores(m: int, sampling_rate: float, noise_multiplier: float, steps: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(scores, included) of one simulated run of the Gaussian mechanism with m Dirac canaries, each
    included with probability 1/2, Poisson-sampled at rate q in every step."""
    included = rng.random(m) < 0.5
    scores = np.zeros(m)
    done = 0
    while done < steps:
        n = min(_CHUNK, steps - done)
        sampled = included & (rng.random((n, m)) < sampling_rate)
        y = noise_multiplier * rng.standard_normal((n, m)) + sampled
        scores += step_log_likelihood_ratio(y, sampling_rate, noise_multiplier).sum(0)
        done += n
    return scores, included


def _correct_counts(scores: np.ndarray, included: np.ndarray, guesses: list[int]) -> np.ndarray:
    """Correct guesses v for each k: "in" for the k highest scores (continuous scores: no ties)."""
    top = np.concatenate([[0], np.cumsum(included[np.argsort(-scores, kind="stable")])])
    return top[np.asarray(guesses)]


def guess_candidates(m: int) -> list[int]:
    """The numbers of "in" guesses :func:`choose_guesses` tries."""
    return sorted({max(1, int(f * m)) for f in GUESS_FRACTIONS})


@dataclass
class SimulationSettings:
    """The Gaussian mechanism one canary sees, and how the ideal is estimated."""

    m: int
    sampling_rate: float
    noise_multiplier: float
    steps: int
    delta: float
    beta: float = 0.05
    selection_repeats: int = 11  # simulations that choose the guesses
    repeats: int = 20  # further simulations that estimate the ideal bound

    def check(self) -> "SimulationSettings":
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 2:
            raise ConfigError(f"the self-audit needs at least 2 canaries, got {self.m!r}")
        if not 0 < self.sampling_rate <= 1:
            raise ConfigError(f"sampling rate must be in (0, 1], got {self.sampling_rate}")
        if not self.noise_multiplier > 0:
            raise ConfigError(f"noise multiplier must be > 0, got {self.noise_multiplier}")
        if not self.steps >= 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.selection_repeats < 1 or self.repeats < 1:
            raise ConfigError("the self-audit needs at least one simulation to choose guesses and one to "
                              "estimate the ideal bound")
        return self


def choose_guesses(sim: SimulationSettings, seed: int) -> int:
    """The number k of "in" guesses whose median number of correct guesses over ``sim.selection_repeats``
    simulated runs of the Gaussian mechanism gives the highest bound (the lower median, for an even
    number of runs). Depends on (m, q, sigma, steps, delta, beta, seed) only."""
    sim.check()
    rng = np.random.default_rng([seed, 1])
    ks = guess_candidates(sim.m)
    correct = np.empty((sim.selection_repeats, len(ks)), dtype=int)
    for i in range(sim.selection_repeats):
        scores, included = simulate_scores(sim.m, sim.sampling_rate, sim.noise_multiplier, sim.steps, rng)
        correct[i] = _correct_counts(scores, included, ks)
    median = np.sort(correct, axis=0)[(sim.selection_repeats - 1) // 2]
    bounds = [one_run_bound(sim.m, k, int(v), sim.delta, sim.beta)["epsilon_lb"] for k, v in zip(ks, median)]
    return ks[int(np.argmax(bounds))]


def ideal_epsilon_lb(sim: SimulationSettings, k: int, seed: int) -> dict:
    """The one-run bound an auditor with the exact likelihood ratio gets against the Gaussian mechanism
    with k "in" guesses: median (the reported value), 10th and 90th percentile over ``sim.repeats``
    simulations drawn independently of those that chose the guesses."""
    sim.check()
    rng = np.random.default_rng([seed, 2])
    correct = []
    for _ in range(sim.repeats):
        scores, included = simulate_scores(sim.m, sim.sampling_rate, sim.noise_multiplier, sim.steps, rng)
        correct.append(int(_correct_counts(scores, included, [k])[0]))
    bound = {v: one_run_bound(sim.m, k, v, sim.delta, sim.beta)["epsilon_lb"] for v in set(correct)}
    values = np.asarray([bound[v] for v in correct])
    return {"median": float(np.median(values)), "p10": float(np.percentile(values, 10)),
            "p90": float(np.percentile(values, 90)), "repeats": int(values.size),
            "statistic": f"median of {values.size} simulated runs"}
