"""Planning a client's DP-SGD budget: calibrate sigma to a target (epsilon, delta) over the whole
participation (rounds x local epochs x steps per epoch), refuse impossible plans before training,
and stop a client before any round that would overrun its budget.

The budget is held under replace-one, the relation of the run's headline epsilon (every upload releases the
client's record count n, so add/remove is not the relation the release is consistent with; see
``alignfl_audit.accounting``). ``privacy.calibration_accountant`` says which upper bound on replace-one
epsilon the calibration and the stop use:

- ``pld`` (default): dp-accounting's pessimistic privacy loss distribution under its REPLACE_ONE relation, on
  the grid ``CALIBRATION_GRID`` (coarser than the reports' grid, so calibration takes a second, and still an
  upper bound: pessimistic rounding on a coarser grid only loosens it); beyond its resource bounds it falls
  back to ``rdp``;
- ``rdp``: dp-accounting's add/remove RDP turned into replace-one by group privacy (looser: more noise for
  the same target, but computable at any setting).

Both are upper bounds on the true replace-one epsilon, so a calibrated plan meets its target under it.
"""
from __future__ import annotations

import functools

from federation.errors import ConfigError
from federation.privacy import accountants
from federation.privacy.spec import PrivacySpec

EPSILON_TOLERANCE = 0.01  # the calibrated epsilon lies in [target - tolerance, target]
CALIBRATION_GRID = 1e-3  # PLD discretization for calibration and the per-round budget stop
MAX_SIGMA = 1e4
_BISECTIONS = 80


def replace_one_epsilon(accountant: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """An upper bound on the replace-one epsilon of ``history`` ((sigma, q, steps) triples)."""
    return _replace_one(accountant, tuple(accountants.merged_history(history)), delta)


@functools.lru_cache(maxsize=256)
def _replace_one(accountant: str, merged: tuple, delta: float) -> float:
    """Cached per composition: the budget stop asks again each round for the same merged history."""
    if not merged:
        return 0.0
    merged = list(merged)
    if accountant == "pld":
        try:
            return accountants.dp_accounting_pld(merged, delta, "replace-one", finest=CALIBRATION_GRID)[0]
        except accountants.ResourceLimit:
            pass
    return accountants.dp_accounting_rdp_replace_one(merged, delta)


def calibrate_noise(spec: PrivacySpec, sample_rate: float, total_steps: int) -> float:
    """The smallest sigma (within tolerance) whose replace-one epsilon after ``total_steps`` is <= the target."""
    if spec.noise_multiplier is not None:
        return float(spec.noise_multiplier)
    target = spec.target_epsilon

    def eps(sigma: float) -> float:
        return replace_one_epsilon(spec.calibration_accountant, [(sigma, sample_rate, total_steps)], spec.delta)

    high = 1.0
    while eps(high) > target:
        high *= 2
        if high > MAX_SIGMA:
            raise ConfigError(f"the budget epsilon={target:g}, delta={spec.delta:g} cannot be met with sampling "
                              f"rate {sample_rate:.4g} over {total_steps} steps (noise multiplier above {MAX_SIGMA:g})")
    low = high / 2 if high > 1.0 else 0.0
    for _ in range(_BISECTIONS):  # invariant: eps(high) <= target < eps(low)
        mid = (low + high) / 2
        e = eps(mid)
        if e <= target:
            high = mid
            if target - e <= EPSILON_TOLERANCE:
                break
        else:
            low = mid
    return float(high)


def spent_epsilon(spec: PrivacySpec, history: list[tuple[float, float, int]]) -> float:
    """The replace-one epsilon of a client's history, by the calibration's accountant (the budget stop)."""
    return replace_one_epsilon(spec.calibration_accountant, history, spec.delta)


def round_would_overrun(spec: PrivacySpec, events, plan, local_epochs: int) -> bool:
    """Whether one more round of ``local_epochs`` epochs of ``plan`` would take a client's recorded DP
    ``events`` past its target epsilon (never, with an explicit noise multiplier and no target)."""
    if spec.target_epsilon is None:
        return False
    planned = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_epoch * local_epochs)
    history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
    return spent_epsilon(spec, history + [planned]) > spec.target_epsilon


def check_adaptive(spec: PrivacySpec, sigma: float, unclipped_num_std: float) -> None:
    if spec.clipping == "adaptive" and sigma >= 2 * unclipped_num_std:
        raise ConfigError(f"adaptive clipping needs noise multiplier < 2 * unclipped_num_std, got sigma={sigma:.4g} "
                          f">= 2 * {unclipped_num_std:.4g}; raise privacy.unclipped_num_std, the batch size or the "
                          "budget")
