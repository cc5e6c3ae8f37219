"""Planning a client's DP-SGD budget: calibrate sigma to a target (epsilon, delta) over the whole
participation (rounds x local epochs x steps per epoch), refuse impossible plans before training,
and stop a client before any round that would overrun its budget."""
from __future__ import annotations

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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(get_noise_multiplier(target_epsilon=spec.target_epsilon, target_delta=spec.delta,
                                              sample_rate=sample_rate, steps=total_steps,
                                              accountant=spec.calibration_accountant,
                                              epsilon_tolerance=EPSILON_TOLERANCE))
    except ValueError as err:
        raise ConfigError(f"the budget epsilon={spec.target_epsilon:g}, delta={spec.delta:g} cannot be met with "
                          f"sampling rate {sample_rate:.4g} over {total_steps} steps ({err})") from None


def spent_epsilon(spec: PrivacySpec, history: list[tuple[float, float, int]]) -> float:
    if not history:
        return 0.0
    acc = create_accountant(spec.calibration_accountant)
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=spec.delta))


def check_adaptive(spec: PrivacySpec, sigma: float, unclipped_num_std: float) -> None:
    if spec.clipping == "adaptive" and sigma >= 2 * unclipped_num_std:
        raise ConfigError(f"adaptive clipping needs noise multiplier < 2 * unclipped_num_std, got sigma={sigma:.4g} "
                          f">= 2 * {unclipped_num_std:.4g}; raise privacy.unclipped_num_std, the batch size or the "
                          "budget")
