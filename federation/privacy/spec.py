"""The privacy section of a config, its checks, and the label every output carries."""
from __future__ import annotations

import typing
from dataclasses import dataclass

from federation.errors import ConfigError

MECHANISMS = ("none", "dp-sgd", "lcd", "lcd-spectral")
CLIPPING = ("fixed", "adaptive", "median-nonprivate")
SCOPES = ("full", "decoder")
# auto: bk when every trainable layer of the privatized module is a plain nn.Linear, else ghost
GRAD_SAMPLE_MODES = ("auto", "bk", "ghost", "hooks", "functorch")

NO_GUARANTEE = "no formal DP guarantee"

# Deliberate breakages of DP-SGD that only tests reach (``DPTrainer(..., fault=...)``), to show that the
# self-audit catches a broken mechanism: gradient noise at a quarter of its scale, or no clipping. No
# config can set them (``alignfl_audit.config`` refuses the key).
FAULT_KEY = "fault"
TEST_ONLY_FAULTS = ("noise-quartered", "unclipped")


@dataclass
class PrivacySpec:
    mechanism: str = "none"
    # DP-SGD
    target_epsilon: typing.Optional[float] = None
    delta: float = 1e-5
    noise_multiplier: typing.Optional[float] = None  # explicit sigma instead of a target epsilon
    scope: str = "full"
    clipping: str = "adaptive"
    max_grad_norm: float = 1.0  # fixed bound, or the adaptive rule's starting bound
    target_quantile: float = 0.5
    clipbound_lr: float = 0.2
    min_clipbound: float = 1e-3
    max_clipbound: float = 1e3
    unclipped_num_std: typing.Optional[float] = None  # default: expected batch size / 20 (Andrew et al.)
    grad_sample_mode: str = "auto"  # resolved per client by DPTrainer (DPTrainer.mode, the ledger)
    calibration_accountant: str = "pld"  # replace-one upper bound for calibration and the budget stop (budget.py)
    # LCD-VAE
    lcd_lambda: float = 1.0

    @property
    def is_dp(self) -> bool:
        return self.mechanism == "dp-sgd"

    def formal_guarantee(self) -> bool:
        """True only for DP-SGD on the whole VAE with a privatized clip bound."""
        return self.is_dp and self.scope == "full" and self.clipping in ("fixed", "adaptive")

    def guarantee_note(self) -> str:
        if self.mechanism == "none":
            return f"{NO_GUARANTEE}: no privacy mechanism"
        if self.mechanism in ("lcd", "lcd-spectral"):
            return f"{NO_GUARANTEE}: LCD-VAE constrains the decoder's Lipschitz constant; it is not differential privacy"
        if self.clipping == "median-nonprivate":
            return (f"{NO_GUARANTEE}: the clip bound is the median of un-clipped per-sample gradient norms of "
                    "the private batch, so the noise scale itself depends on the data")
        if self.scope == "decoder":
            return (f"{NO_GUARANTEE}: only the decoder is trained with DP-SGD, but its per-sample gradients "
                    "flow through a non-private encoder trained on every record")
        return ("(epsilon, delta)-DP per client for its shared uploads, from the recorded DP-SGD events "
                "(record-level; the headline is replace-one, since the client's record count n sets the sampling "
                "rate q = B/n and travels in each upload; add/remove, with n treated as public, beside it)")

    def validate(self) -> "PrivacySpec":
        if self.mechanism not in MECHANISMS:
            raise ConfigError(f"privacy.mechanism must be one of {list(MECHANISMS)}, not {self.mechanism!r}")
        if self.mechanism in ("lcd", "lcd-spectral") and not self.lcd_lambda >= 0:
            raise ConfigError(f"privacy.lcd_lambda must be >= 0, got {self.lcd_lambda}")
        if not self.is_dp:
            return self
        if self.scope not in SCOPES:
            raise ConfigError(f"privacy.scope must be one of {list(SCOPES)}, not {self.scope!r}")
        if self.clipping not in CLIPPING:
            raise ConfigError(f"privacy.clipping must be one of {list(CLIPPING)}, not {self.clipping!r}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ConfigError(f"privacy.grad_sample_mode must be one of {list(GRAD_SAMPLE_MODES)}, "
                              f"not {self.grad_sample_mode!r}")
        if self.calibration_accountant not in ("pld", "rdp"):
            raise ConfigError("privacy.calibration_accountant must be pld or rdp (the budget is held under replace-one, "
                              f"which these bound), not {self.calibration_accountant!r}")
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ConfigError("dp-sgd needs exactly one of privacy.target_epsilon and privacy.noise_multiplier")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ConfigError(f"privacy.target_epsilon must be > 0, got {self.target_epsilon}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError(f"privacy.noise_multiplier must be > 0 (0 adds no noise: use mechanism none), "
                              f"got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta must be in (0, 1/n), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"privacy.max_grad_norm (the clip bound) must be > 0, got {self.max_grad_norm}")
        if self.clipping == "adaptive":
            if not 0 < self.target_quantile < 1:
                raise ConfigError(f"privacy.target_quantile must be in (0, 1), got {self.target_quantile}")
            if not self.clipbound_lr > 0:
                raise ConfigError(f"privacy.clipbound_lr must be > 0, got {self.clipbound_lr}")
            if not 0 < self.min_clipbound < self.max_clipbound:
                raise ConfigError("privacy.min_clipbound must be > 0 and below privacy.max_clipbound "
                                  f"(got {self.min_clipbound} and {self.max_clipbound})")
            if self.unclipped_num_std is not None and not self.unclipped_num_std > 0:
                raise ConfigError(f"privacy.unclipped_num_std must be > 0, got {self.unclipped_num_std}")
        return self

    def check_client(self, client: int, n: int) -> None:
        """Checks that need the client's record count."""
        if self.is_dp and not self.delta < 1 / n:
            raise ConfigError(f"privacy.delta={self.delta:g} must be below 1/n = 1/{n} = {1 / n:.3g} for client "
                              f"{client}")
