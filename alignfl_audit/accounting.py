"""Epsilon from recorded DP events, by four independent accountants.

Opacus RDP, Opacus PRV, dp-accounting RDP and dp-accounting PLD each turn a client's history of
(noise multiplier, sampling rate, steps) into an epsilon at the given delta. All four are upper
bounds on the true epsilon of the Poisson-subsampled Gaussian mechanism; the headline is the
tightest one that succeeded. A PRV failure (it happens at large epsilon) is noted, not raised.
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings

from absl import logging as absl_logging
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from opacus.accountants import PRVAccountant, RDPAccountant

from federation.errors import ConfigError

ACCOUNTANTS = ("opacus_rdp", "opacus_prv", "dp_accounting_rdp", "dp_accounting_pld")
PRV_EPS_ERROR = 0.01
PLD_DISCRETIZATION = 1e-4


def _opacus(cls, history, delta: float) -> float:
    acc = cls()
    acc.history = list(history)
    if cls is PRVAccountant:
        return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
    return float(acc.get_epsilon(delta=delta))


def _event(history) -> dp_event.DpEvent:
    return dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
        for sigma, q, steps in history])


def _dp_rdp(history, delta: float) -> float:
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(_event(history))
    return float(acc.get_epsilon(delta))


def _dp_pld(history, delta: float) -> float:
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    acc.compose(_event(history))
    return float(acc.get_epsilon(delta))


_FUNCS = {"opacus_rdp": lambda h, d: _opacus(RDPAccountant, h, d),
          "opacus_prv": lambda h, d: _opacus(PRVAccountant, h, d),
          "dp_accounting_rdp": _dp_rdp, "dp_accounting_pld": _dp_pld}


@contextlib.contextmanager
def _quiet():
    """dp-accounting logs each RDP order it drops as non-convergent (the order is then excluded,
    which can only loosen its bound); keep that out of the user's terminal."""
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        absl_logging.set_verbosity(level)


def check_history(history, delta: float) -> None:
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    for sigma, q, steps in history:
        if not sigma >= 0:
            raise ConfigError(f"noise multiplier must be >= 0, got {sigma}")
        if not 0 < q <= 1:
            raise ConfigError(f"sampling rate must be in (0, 1], got {q}")
        if not (isinstance(steps, int) and steps >= 0):
            raise ConfigError(f"steps must be a non-negative integer, got {steps}")


def epsilons(history: list[tuple[float, float, int]], delta: float) -> dict:
    """{accountant: {"epsilon": float | None, "error": str | None}} plus "headline" and "flags"."""
    check_history(history, delta)
    results: dict = {}
    for name in ACCOUNTANTS:
        if not history or all(steps == 0 for _, _, steps in history):
            results[name] = {"epsilon": 0.0, "error": None}
            continue
        if any(sigma == 0 for sigma, _, steps in history if steps):
            results[name] = {"epsilon": math.inf, "error": None}
            continue
        try:
            with _quiet():
                eps = _FUNCS[name](history, delta)
            if not math.isfinite(eps) or eps < 0:
                raise ValueError(f"returned {eps}")
            results[name] = {"epsilon": eps, "error": None}
        except Exception as err:  # noqa: BLE001 - an accountant failing falls back, with a note
            results[name] = {"epsilon": None, "error": f"{type(err).__name__}: {err}"}
    ok = {k: v["epsilon"] for k, v in results.items() if v["epsilon"] is not None}
    if not ok:
        raise ConfigError("no accountant could compute epsilon for this history")
    best = min(ok, key=ok.get)
    return {"accountants": results, "headline": {"accountant": best, "epsilon": ok[best]},
            "flags": _disagreements(ok)}


def _disagreements(eps: dict) -> list[str]:
    """Flags beyond the accountants' own error bounds.

    PRV (Opacus, eps_error) and PLD (pessimistic, discretization) are both near-exact: they must
    agree within PRV's eps_error plus 1% of epsilon for PLD's discretization. The two RDP
    accountants use different order grids; they must agree within 5%. RDP's conversion is a
    looser upper bound, so neither RDP value may fall below a near-exact one by more than the
    same tolerance."""
    flags = []
    if not all(math.isfinite(v) for v in eps.values()):
        return flags
    tight = [eps[k] for k in ("opacus_prv", "dp_accounting_pld") if k in eps]
    tol = PRV_EPS_ERROR + 0.01 * max(eps.values())
    if len(tight) == 2 and abs(tight[0] - tight[1]) > tol:
        flags.append(f"PRV ({tight[0]:.4f}) and PLD ({tight[1]:.4f}) differ by more than {tol:.4f}")
    rdp = [eps[k] for k in ("opacus_rdp", "dp_accounting_rdp") if k in eps]
    if len(rdp) == 2 and abs(rdp[0] - rdp[1]) > 0.05 * max(rdp):
        flags.append(f"Opacus RDP ({rdp[0]:.4f}) and dp-accounting RDP ({rdp[1]:.4f}) differ by more than 5%")
    if tight and rdp and min(rdp) < max(tight) - tol:
        flags.append(f"an RDP bound ({min(rdp):.4f}) is below a PRV/PLD bound ({max(tight):.4f})")
    return flags


def ledger_epsilons(ledger: dict) -> dict:
    """Per-client results for a ledger (a ``PrivacyLedger.to_json()`` dict). Mechanisms without a
    formal guarantee get no epsilon, only the reason."""
    from federation.privacy.ledger import PrivacyLedger

    led = PrivacyLedger.from_json(ledger)
    out = {"mechanism": led.mechanism, "formal_guarantee": led.formal_guarantee, "note": led.note,
           "delta": led.delta, "target_epsilon": led.target_epsilon, "clients": {}}
    if not led.formal_guarantee:
        out["epsilon_withheld"] = led.note
        return out
    computed: dict[tuple, dict] = {}  # clients with the same history (same n, sigma, steps) share one result
    for cid in led.client_ids():
        if str(cid) in led.unaccounted:  # some of its spend could not be read: no epsilon, never an under-count
            out.setdefault("unaccounted", {})[str(cid)] = led.unaccounted[str(cid)]
            continue
        history = tuple(led.history(cid))
        if history not in computed:
            computed[history] = epsilons(list(history), led.delta)
        out["clients"][str(cid)] = copy.deepcopy(computed[history])
    return out
