"""Planning a client's DP-SGD budget: calibrate sigma to a target (epsilon, delta) over the whole
participation (rounds x local epochs x steps per epoch), refuse impossible plans before training,
and stop a client before any round that would overrun its budget."""
from __future__ import annotations

import functools
import warnings

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from federation.errors import ConfigError
from federation.privacy.spec import PrivacySpec

EPSILON_TOLERANCE = 0.01


def calibrate_noise(spec: PrivacySpec, sample_rate: float, total_steps: int) -> float:
    """The smallest sigma (within tolerance) whose epsilon after ``total_steps`` is <= the target."""
    if spec.noise_multiplier is not None:
        return float(spec.noise_multiplier)
    try:
        return _calibrated(spec.target_epsilon, spec.delta, sample_rate, total_steps, spec.calibration_accountant)
    except ValueError as err:
        raise ConfigError(f"the budget epsilon={spec.target_epsilon:g}, delta={spec.delta:g} cannot be met with "
                          f"sampling rate {sample_rate:.4g} over {total_steps} steps ({err})") from None


@functools.lru_cache(maxsize=256)
def _calibrated(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Opacus's calibration, once per distinct plan (clients of the same size share it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant, epsilon_tolerance=EPSILON_TOLERANCE))


def spent_epsilon(spec: PrivacySpec, history: list[tuple[float, float, int]]) -> float:
    if not history:
        return 0.0
    return _spent(spec.calibration_accountant, spec.delta, tuple(tuple(h) for h in history))


@functools.lru_cache(maxsize=1024)
def _spent(accountant: str, delta: float, history: tuple) -> float:
    acc = create_accountant(accountant)
    acc.history = [tuple(h) for h in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


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
