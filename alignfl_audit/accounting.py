"""Epsilon from recorded DP events, by four independent accountants.

Opacus RDP, Opacus PRV, dp-accounting RDP and dp-accounting PLD each turn a client's history of
(noise multiplier, sampling rate, steps) into an epsilon at the given delta. All four are upper
bounds on the true epsilon of the Poisson-subsampled Gaussian mechanism; the headline is the
tightest one that succeeded. A PRV failure (it happens at large epsilon) is noted, not raised.

Every call is bounded in time and memory. RDP costs next to nothing at any setting. PRV and PLD
discretize the privacy loss on a grid whose size grows with epsilon (at sigma = 0.3 over 10^4 steps
it would take gigabytes); their grid sizes are computed before anything is discretized:
- PRV (Opacus): the grid Opacus would build at ``PRV_EPS_ERROR``; beyond ``PRV_POINTS`` points PRV is
  not computed, and a note says so.
- PLD (dp-accounting, pessimistic connect-the-dots): the grid starts at ``PLD_DISCRETIZATION`` and is
  coarsened until one step's PLD has at most ``PLD_STEP_POINTS`` points and the composed PLD (its size
  from dp-accounting's own truncation bounds) at most ``PLD_POINTS``. Pessimistic rounding on a coarser
  grid still gives an upper bound, only a looser one; a note gives the grid used.
When PRV or PLD is not computed, the headline falls back to the tightest RDP bound, with a note.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings

from absl import logging as absl_logging
from dp_accounting.pld import common as pld_common
from dp_accounting.pld import privacy_loss_distribution, privacy_loss_mechanism
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

from federation.errors import ConfigError

ACCOUNTANTS = ("opacus_rdp", "opacus_prv", "dp_accounting_rdp", "dp_accounting_pld")
PRV_EPS_ERROR = 0.01
PRV_POINTS = 2 ** 21  # Opacus PRV's grid at most (a few seconds and ~0.5 GB at this size)
PLD_DISCRETIZATION = 1e-4  # the finest PLD grid
PLD_STEP_POINTS = 2 ** 17  # one step's PLD at most (each of its remove / add halves)
PLD_POINTS = 2 ** 20  # a composed PLD at most: the length of the FFT that composes it
PLD_PROBE_POINTS = 2 ** 12  # one step's PLD on the probe grid that measures the composition's width
PLD_TAIL_MASS = 1e-15  # dp-accounting's truncation in self_compose, counted as infinite loss (pessimistic)
PLD_SECONDS = 10.0  # a history of many different mechanisms: PLD gives up after this long, between two of them
_PLD_ATTEMPTS = 3


class ResourceLimit(Exception):
    """An accountant would exceed its bound on time and memory: not computed."""


def merged_history(history) -> list[tuple[float, float, int]]:
    """The same composition with the steps of identical (sigma, q) summed, in order of first appearance:
    a ledger lists every round, and composition does not depend on the order of the mechanisms."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        if n:
            steps[(sigma, q)] = steps.get((sigma, q), 0) + n
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


def _opacus_rdp(history, delta: float) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def _opacus_prv(history, delta: float) -> float:
    acc = PRVAccountant()
    acc.history = list(history)
    delta_error = delta / 1000  # Opacus's default, which get_epsilon uses below
    domain = acc._get_domain(prvs=[PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history],
                             num_self_compositions=[steps for _, _, steps in history], eps_error=PRV_EPS_ERROR,
                             delta_error=delta_error)
    if domain.size * len(history) > PRV_POINTS:  # one grid per distinct mechanism
        raise ResourceLimit(f"its grid would need {domain.size:.3g} points"
                            f"{f' for each of {len(history)} mechanisms' if len(history) > 1 else ''} "
                            f"(limit {PRV_POINTS})")
    return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR, delta_error=delta_error))


def _event(history) -> dp_event.DpEvent:
    return dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
        for sigma, q, steps in history])


def _dp_rdp(history, delta: float) -> float:
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(_event(history))
    return float(acc.get_epsilon(delta))


_ADJACENCY = {"add-remove": (privacy_loss_mechanism.AdjacencyType.REMOVE, privacy_loss_mechanism.AdjacencyType.ADD)}
_NEIGHBOURS = {"add-remove": privacy_loss_distribution.NeighborRel.ADD_OR_REMOVE_ONE}


def _pld_loss_span(history, relation: str) -> float:
    """The widest range of one step's privacy loss (dp-accounting's connect-the-dots bounds, computed before
    anything is discretized)."""
    span = 0.0
    for sigma, q, _ in history:
        for adjacency in _ADJACENCY[relation]:
            b = privacy_loss_mechanism.GaussianPrivacyLoss(sigma, sampling_prob=q,
                                                           adjacency_type=adjacency).connect_dots_bounds()
            span = max(span, b.epsilon_upper - b.epsilon_lower)
    return span


def _pld_points(pld, steps: int) -> int:
    """Points of ``pld.self_compose(steps)``: dp-accounting's own truncation bounds for it."""
    halves = [pld._pmf_remove] if pld._symmetric else [pld._pmf_remove, pld._pmf_add]
    dense = [h.to_dense_pmf() if hasattr(h, "to_dense_pmf") else h for h in halves]  # a few-point PLD is sparse
    return max(hi - lo + 1 for lo, hi in (pld_common.compute_self_convolve_bounds(h._probs, steps, PLD_TAIL_MASS)
                                          for h in dense))


def _pld_build(history, relation: str, interval: float, deadline: float) -> tuple[list, int]:
    """Each step's PLD on the grid, and the points the composition of all of them will take."""
    plds = []
    for sigma, q, steps in history:
        _check_deadline(deadline)
        plds.append((privacy_loss_distribution.from_gaussian_mechanism(
            sigma, sampling_prob=q, value_discretization_interval=interval, pessimistic_estimate=True,
            neighboring_relation=_NEIGHBOURS[relation]), steps))
    return plds, sum(_pld_points(pld, steps) for pld, steps in plds)


def _check_deadline(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise ResourceLimit(f"not finished within {PLD_SECONDS:g} s")


def _dp_pld(history, delta: float, relation: str = "add-remove") -> tuple[float, str | None]:
    """dp-accounting's pessimistic PLD of the composition, on the finest grid within the resource bounds;
    (epsilon, a note when the grid had to be coarser than PLD_DISCRETIZATION).

    A probe on a coarse grid (PLD_PROBE_POINTS per step, cheap) measures how wide the composed privacy loss
    is; the grid is then the finest that keeps every step within PLD_STEP_POINTS and the composition within
    PLD_POINTS, and is checked again before the composition is computed."""
    deadline = time.monotonic() + PLD_SECONDS
    span = _pld_loss_span(history, relation)
    interval = max(PLD_DISCRETIZATION, span / PLD_STEP_POINTS)
    probe = max(interval, span / PLD_PROBE_POINTS)
    interval = max(interval, _pld_build(history, relation, probe, deadline)[1] * probe / PLD_POINTS)
    for _ in range(_PLD_ATTEMPTS):
        plds, points = _pld_build(history, relation, interval, deadline)
        if points <= PLD_POINTS:
            break
        interval *= 1.05 * points / PLD_POINTS
    else:
        raise ResourceLimit(f"its composition would need {points:.3g} points even on a grid of {interval:.3g} "
                            f"(limit {PLD_POINTS})")
    composed = None
    for pld, steps in plds:
        _check_deadline(deadline)
        part = pld.self_compose(steps, tail_mass_truncation=PLD_TAIL_MASS)
        composed = part if composed is None else composed.compose(part, tail_mass_truncation=PLD_TAIL_MASS)
    note = None
    if interval > PLD_DISCRETIZATION:
        note = (f"grid {interval:.3g} instead of {PLD_DISCRETIZATION:g}, to stay within {PLD_POINTS} points "
                "(pessimistic rounding: still an upper bound, a looser one)")
    return float(composed.get_epsilon_for_delta(delta)), note


_FUNCS = {"opacus_rdp": _opacus_rdp, "opacus_prv": _opacus_prv, "dp_accounting_rdp": _dp_rdp,
          "dp_accounting_pld": _dp_pld}


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
    """{accountant: {"epsilon": float | None, "error": str | None}} plus "headline", "flags" and "notes"."""
    check_history(history, delta)
    history = merged_history(history)
    results: dict = {}
    notes: list[str] = []
    coarse: set[str] = set()
    for name in ACCOUNTANTS:
        if not history:
            results[name] = {"epsilon": 0.0, "error": None}
            continue
        if any(sigma == 0 for sigma, _, _ in history):
            results[name] = {"epsilon": math.inf, "error": None}
            continue
        try:
            with _quiet():
                out = _FUNCS[name](history, delta)
            eps, note = out if isinstance(out, tuple) else (out, None)
            if not math.isfinite(eps) or eps < 0:
                raise ValueError(f"returned {eps}")
            results[name] = {"epsilon": eps, "error": None}
            if note:
                notes.append(f"{name}: {note}")
                coarse.add(name)
        except ResourceLimit as err:
            results[name] = {"epsilon": None, "error": f"not computed: {err}"}
        except Exception as err:  # noqa: BLE001 - an accountant failing falls back, with a note
            results[name] = {"epsilon": None, "error": f"{type(err).__name__}: {err}"}
    ok = {k: v["epsilon"] for k, v in results.items() if v["epsilon"] is not None}
    if not ok:
        raise ConfigError("no accountant could compute epsilon for this history")
    best = min(ok, key=ok.get)
    missing = [k for k in ("opacus_prv", "dp_accounting_pld") if k not in ok]
    if missing:
        notes.append(f"{' and '.join(missing)} not computed (see its error): the headline is the tightest of "
                     f"{', '.join(sorted(ok))}")
    return {"accountants": results, "headline": {"accountant": best, "epsilon": ok[best]},
            "flags": _disagreements(ok, coarse), "notes": notes}


def _disagreements(eps: dict, coarse: set[str] = frozenset()) -> list[str]:
    """Flags beyond the accountants' own error bounds.

    PRV (Opacus, eps_error) and PLD (pessimistic, discretization) are both near-exact: they must
    agree within PRV's eps_error plus 1% of epsilon for PLD's discretization. The two RDP
    accountants use different order grids; they must agree within 5%. RDP's conversion is a
    looser upper bound, so neither RDP value may fall below a near-exact one by more than the
    same tolerance. A PLD on a coarsened grid (``coarse``) is looser by design: it may exceed the
    others, and is flagged only when it falls below PRV."""
    flags = []
    if not all(math.isfinite(v) for v in eps.values()):
        return flags
    tight = {k: eps[k] for k in ("opacus_prv", "dp_accounting_pld") if k in eps}
    tol = PRV_EPS_ERROR + 0.01 * max(eps.values())
    if len(tight) == 2:
        prv, pld = tight["opacus_prv"], tight["dp_accounting_pld"]
        if pld < prv - tol or (abs(prv - pld) > tol and "dp_accounting_pld" not in coarse):
            flags.append(f"PRV ({prv:.4f}) and PLD ({pld:.4f}) differ by more than {tol:.4f}")
    rdp = [eps[k] for k in ("opacus_rdp", "dp_accounting_rdp") if k in eps]
    if len(rdp) == 2 and abs(rdp[0] - rdp[1]) > 0.05 * max(rdp):
        flags.append(f"Opacus RDP ({rdp[0]:.4f}) and dp-accounting RDP ({rdp[1]:.4f}) differ by more than 5%")
    fine = [v for k, v in tight.items() if k not in coarse]
    if fine and rdp and min(rdp) < max(fine) - tol:
        flags.append(f"an RDP bound ({min(rdp):.4f}) is below a PRV/PLD bound ({max(fine):.4f})")
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
    for cid in led.client_ids():
        if str(cid) in led.unaccounted:  # some of its spend could not be read: no epsilon, never an under-count
            out.setdefault("unaccounted", {})[str(cid)] = led.unaccounted[str(cid)]
            continue
        out["clients"][str(cid)] = epsilons(led.history(cid), led.delta)
    return out
