"""The accountants, each a function of (history, delta) bounded in time and memory.

A history is a list of (noise multiplier, sampling rate, steps) of the Poisson-subsampled Gaussian
mechanism, each (sigma, q) once (``merged_history``). Every function returns an upper bound on
epsilon under one neighbouring relation (``accounting.RELATIONS`` says which function serves which):

- ``opacus_rdp``, ``opacus_prv``: Opacus's RDP and PRV accountants, add/remove only.
- ``dp_accounting_rdp``: dp-accounting's RDP, add/remove (its RDP of a Poisson-sampled event knows no
  other relation).
- ``dp_accounting_rdp_replace_one``: the same RDP curve turned into replace-one by RDP group privacy: two
  datasets that differ in one replaced record are two add/remove steps apart, and a mechanism that is
  (alpha, rho)-RDP for neighbours is (alpha/2, 3 rho)-RDP for datasets two steps apart, alpha >= 4
  (Mironov 2017, "Renyi differential privacy", Proposition 2); dp-accounting converts the curve to
  (epsilon, delta). Looser than PLD, but always computable.
- ``dp_accounting_pld``: dp-accounting's privacy loss distribution (pessimistic connect-the-dots), under
  either relation (its REPLACE adjacency is the replace-one analysis of Poisson subsampling).

RDP costs next to nothing at any setting. PRV and PLD discretize the privacy loss on a grid whose size
grows with epsilon (at sigma = 0.3 over 10^4 steps it would take gigabytes); their grid sizes are computed
before anything is discretized:
- PRV: the grid Opacus would build at ``PRV_EPS_ERROR``; beyond ``PRV_POINTS`` points PRV is not computed
  (``ResourceLimit``).
- PLD: the grid starts at ``PLD_DISCRETIZATION`` and is coarsened until one step's PLD has at most
  ``PLD_STEP_POINTS`` points and the composed PLD (its size from dp-accounting's own truncation bounds) at
  most ``PLD_POINTS``, for at most ``PLD_MECHANISMS`` different (sigma, q). Pessimistic rounding on a
  coarser grid still gives an upper bound, only a looser one; the function then returns a note with the
  grid used.
The bounds are on sizes, not on a clock, so the same history always gives the same result.
"""
from __future__ import annotations

from dp_accounting import dp_event
from dp_accounting.pld import common as pld_common
from dp_accounting.pld import privacy_loss_distribution, privacy_loss_mechanism
from dp_accounting.rdp import rdp_privacy_accountant
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

PRV_EPS_ERROR = 0.01
PRV_POINTS = 2 ** 21  # Opacus PRV's grid at most (a few seconds and ~0.5 GB at this size)
PLD_DISCRETIZATION = 1e-4  # the finest PLD grid
PLD_STEP_POINTS = 2 ** 16  # one step's PLD at most (each of its remove / add halves)
PLD_POINTS = 2 ** 20  # a composed PLD at most: the length of the FFT that composes it
PLD_PROBE_POINTS = 2 ** 12  # one step's PLD on the probe grid that measures the composition's width
PLD_TAIL_MASS = 1e-15  # dp-accounting's truncation in self_compose, counted as infinite loss (pessimistic)
PLD_MECHANISMS = 8  # distinct (sigma, q) at most: each is discretized on its own (a deterministic bound, not a clock)
_PLD_ATTEMPTS = 3
_GROUP_MIN_ORDER = 4  # Proposition 2 (c = 1) needs alpha >= 2^(c+1)

_ADJACENCY = {"add-remove": (privacy_loss_mechanism.AdjacencyType.REMOVE, privacy_loss_mechanism.AdjacencyType.ADD),
              "replace-one": (privacy_loss_mechanism.AdjacencyType.REPLACE,)}
_NEIGHBOURS = {"add-remove": privacy_loss_distribution.NeighborRel.ADD_OR_REMOVE_ONE,
               "replace-one": privacy_loss_distribution.NeighborRel.REPLACE_ONE}


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


def opacus_rdp(history, delta: float) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def opacus_prv(history, delta: float) -> float:
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


def dp_event_of(history) -> dp_event.DpEvent:
    return dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
        for sigma, q, steps in history])


def _rdp_accountant(history) -> rdp_privacy_accountant.RdpAccountant:
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event_of(history))
    return acc


def dp_accounting_rdp(history, delta: float) -> float:
    return float(_rdp_accountant(history).get_epsilon(delta))


def dp_accounting_rdp_replace_one(history, delta: float) -> float:
    """Replace-one from the add/remove RDP curve by group privacy for two steps (Mironov 2017, Prop. 2)."""
    acc = _rdp_accountant(history)
    orders, rdp = acc.orders, acc.rdp
    keep = orders >= _GROUP_MIN_ORDER
    return float(rdp_privacy_accountant.compute_epsilon(orders[keep] / 2, 3 * rdp[keep], delta)[0])


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


def _pld_build(history, relation: str, interval: float) -> tuple[list, int]:
    """Each step's PLD on the grid, and the points the composition of all of them will take."""
    plds = [(privacy_loss_distribution.from_gaussian_mechanism(
        sigma, sampling_prob=q, value_discretization_interval=interval, pessimistic_estimate=True,
        neighboring_relation=_NEIGHBOURS[relation]), steps) for sigma, q, steps in history]
    return plds, sum(_pld_points(pld, steps) for pld, steps in plds)


def dp_accounting_pld(history, delta: float, relation: str = "add-remove",
                      finest: float = PLD_DISCRETIZATION) -> tuple[float, str | None]:
    """dp-accounting's pessimistic PLD of the composition, on the finest grid within the resource bounds
    (``finest`` at the most); (epsilon, a note when the grid had to be coarser than ``finest``).

    A probe on a coarse grid (PLD_PROBE_POINTS per step, cheap) measures how wide the composed privacy loss
    is; the grid is then the finest that keeps every step within PLD_STEP_POINTS and the composition within
    PLD_POINTS, and is checked again before the composition is computed."""
    if len(history) > PLD_MECHANISMS:
        raise ResourceLimit(f"{len(history)} different (sigma, q) to discretize (limit {PLD_MECHANISMS})")
    span = _pld_loss_span(history, relation)
    interval = max(finest, span / PLD_STEP_POINTS)
    probe = max(interval, span / PLD_PROBE_POINTS)
    interval = max(interval, _pld_build(history, relation, probe)[1] * probe / PLD_POINTS)
    for _ in range(_PLD_ATTEMPTS):
        plds, points = _pld_build(history, relation, interval)
        if points <= PLD_POINTS:
            break
        interval *= 1.05 * points / PLD_POINTS
    else:
        raise ResourceLimit(f"its composition would need {points:.3g} points even on a grid of {interval:.3g} "
                            f"(limit {PLD_POINTS})")
    composed = None
    for pld, steps in plds:
        part = pld.self_compose(steps, tail_mass_truncation=PLD_TAIL_MASS)
        composed = part if composed is None else composed.compose(part, tail_mass_truncation=PLD_TAIL_MASS)
    note = None
    if interval > finest:
        note = (f"grid {interval:.3g} instead of {finest:g}, to stay within {PLD_POINTS} points "
                "(pessimistic rounding: still an upper bound, a looser one)")
    return float(composed.get_epsilon_for_delta(delta)), note
