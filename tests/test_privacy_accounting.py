"""Accounting (``alignfl_audit.accounting``) and noise calibration (``federation.privacy.budget``).

Tolerances are the accountants' own: RDP values are exact functions of their inputs (float
tolerance 1e-9 relative); Opacus PRV is accurate to ``PRV_EPS_ERROR`` (0.01) and dp-accounting
PLD to its discretization, so for those (and the headline, which may be either) pairs are
compared within PRV_EPS_ERROR + 1% of epsilon.

PRV and PLD take about a second per evaluation on a busy machine, so their properties run on
fewer examples and a narrower range (sigma >= 0.8, q <= 0.05, steps <= 1000, i.e. epsilon up to
~20) than the RDP accountants (sigma in [0.6, 3], q in [0.001, 0.1], steps in [1, 2000]).
"""
from __future__ import annotations

import json
import math
import time

import pytest
from hypothesis import given, settings, strategies as st
from scipy import optimize, special

from alignfl_audit import accounting
from federation.privacy import accountants
from alignfl_audit.accounting import (ACCOUNTANTS, PRV_EPS_ERROR, RELATIONS, client_epsilons, epsilons,
                                      ledger_epsilons, run_epsilon)
from alignfl_audit.cli import main
from federation.errors import ConfigError
from federation.privacy.budget import EPSILON_TOLERANCE, calibrate_noise, check_adaptive, spent_epsilon
from federation.privacy.ledger import DPEvent, PrivacyLedger
from federation.privacy.spec import PrivacySpec

DELTA = 1e-5
RDP = ("opacus_rdp", "dp_accounting_rdp")


def tol(name: str, eps: float) -> float:
    if name in RDP:
        return 1e-9 * (1 + eps)
    return PRV_EPS_ERROR + 0.01 * eps


def single(name: str, sigma: float, q: float, steps: int) -> float:
    with accounting._quiet():
        out = accounting._FUNCS[name]([(sigma, q, steps)], DELTA)
    return out[0] if isinstance(out, tuple) else out  # PLD: (epsilon, note on its grid)


@st.composite
def perturbations(draw, sigma_lo=0.6, q_hi=0.1, steps_hi=2000):
    """(base point, point that should be at least as private or at most as private, direction)."""
    sigma = draw(st.floats(sigma_lo, 3.0))
    q = 10 ** draw(st.floats(-3, math.log10(q_hi)))
    steps = draw(st.integers(1, steps_hi))
    which = draw(st.sampled_from(["sigma", "steps", "q"]))
    if which == "sigma":
        other = (min(3.0, sigma * 10 ** draw(st.floats(0.001, 0.7))), q, steps)
    elif which == "steps":
        other = (sigma, q, min(steps_hi, steps + draw(st.integers(1, steps_hi))))
    else:
        other = (sigma, min(q_hi, q * 10 ** draw(st.floats(0.001, 2))), steps)
    return (sigma, q, steps), other, which


def check_order(name: str, base: float, other: float, which: str) -> None:
    """sigma up: epsilon does not increase; steps or q up: epsilon does not decrease."""
    if which == "sigma":
        assert other <= base + tol(name, base), f"{name}: eps rose from {base} to {other} with more noise"
    else:
        assert other >= base - tol(name, base), f"{name}: eps fell from {base} to {other} with more {which}"


@settings(max_examples=30, deadline=None)
@given(perturbations())
def test_rdp_epsilon_is_monotone(case):
    base, other, which = case
    for name in RDP:
        check_order(name, single(name, *base), single(name, *other), which)


@settings(max_examples=10, deadline=None)
@given(perturbations(sigma_lo=0.8, q_hi=0.05, steps_hi=1000))
def test_every_accountant_and_the_headline_are_monotone(case):
    base, other, which = case
    a, b = epsilons([base], DELTA), epsilons([other], DELTA)
    for name in ACCOUNTANTS:
        check_order(name, a["accountants"][name]["epsilon"], b["accountants"][name]["epsilon"], which)
    check_order("headline", a["headline"]["epsilon"], b["headline"]["epsilon"], which)


@pytest.mark.parametrize("history", [
    [(1.0, 0.01, 1000)],
    [(1.5, 0.05, 500)],
    [(2.5, 0.1, 200)],
    [(1.1, 0.02, 300), (0.9, 0.05, 100)],  # a composition of two different mechanisms
], ids=["sigma1-q0.01", "sigma1.5-q0.05", "sigma2.5-q0.1", "composed"])
def test_all_four_accountants_agree_on_moderate_settings(history):
    res = epsilons(history, DELTA)
    values = {k: v["epsilon"] for k, v in res["accountants"].items()}
    assert set(values) == set(ACCOUNTANTS)
    assert all(v is not None and math.isfinite(v) and v > 0 for v in values.values()), res
    assert all(v["error"] is None for v in res["accountants"].values())
    assert res["flags"] == []
    # RDP's conversion is an upper bound on the (near-exact) PRV / PLD values
    for rdp in RDP:
        for tight in ("opacus_prv", "dp_accounting_pld"):
            assert values[rdp] >= values[tight] - tol(tight, values[tight])
    # the headline is the tightest that succeeded
    best = min(values, key=values.get)
    assert res["headline"] == {"accountant": best, "epsilon": values[best]}


def test_disagreement_beyond_error_bounds_is_flagged():
    flags = accounting._disagreements({"opacus_rdp": 2.0, "opacus_prv": 1.5, "dp_accounting_rdp": 2.5,
                                       "dp_accounting_pld": 1.0})
    assert any("PRV" in f and "PLD" in f for f in flags)
    assert any("Opacus RDP" in f for f in flags)
    assert accounting._disagreements({"opacus_rdp": 2.0, "opacus_prv": 1.8, "dp_accounting_rdp": 2.01,
                                      "dp_accounting_pld": 1.795}) == []


def test_a_prv_failure_falls_back_with_a_note(monkeypatch):
    def broken(history, delta):
        raise RuntimeError("PRV domain too large")

    monkeypatch.setitem(accounting._FUNCS, "opacus_prv", broken)
    res = epsilons([(1.0, 0.01, 1000)], DELTA)
    prv = res["accountants"]["opacus_prv"]
    assert prv["epsilon"] is None
    assert "RuntimeError" in prv["error"] and "PRV domain too large" in prv["error"]
    assert res["headline"]["accountant"] != "opacus_prv"
    others = {k: v["epsilon"] for k, v in res["accountants"].items() if k != "opacus_prv"}
    assert all(v is not None for v in others.values())
    assert res["headline"]["epsilon"] == min(others.values())


def test_a_non_finite_epsilon_counts_as_a_failure(monkeypatch):
    monkeypatch.setitem(accounting._FUNCS, "opacus_prv", lambda h, d: float("nan"))
    monkeypatch.setitem(accounting._FUNCS, "dp_accounting_pld", lambda h, d: -1.0)
    res = epsilons([(1.0, 0.01, 10)], DELTA)
    assert res["accountants"]["opacus_prv"]["epsilon"] is None and "nan" in res["accountants"]["opacus_prv"]["error"]
    assert res["accountants"]["dp_accounting_pld"]["epsilon"] is None
    assert res["headline"]["accountant"] in RDP


def test_every_accountant_failing_is_a_config_error(monkeypatch):
    for name in ACCOUNTANTS:
        monkeypatch.setitem(accounting._FUNCS, name, lambda h, d: 1 / 0)
    with pytest.raises(ConfigError, match="no accountant"):
        epsilons([(1.0, 0.01, 10)], DELTA)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(0.0, 50.0)), min_size=4, max_size=4).filter(
    lambda v: any(x is not None for x in v)))
def test_headline_is_the_minimum_of_the_successful_accountants(values):
    fakes = dict(zip(ACCOUNTANTS, values))
    saved = dict(accounting._FUNCS)
    try:
        for name, value in fakes.items():
            accounting._FUNCS[name] = ((lambda h, d: (_ for _ in ()).throw(ValueError("boom"))) if value is None
                                       else (lambda h, d, v=value: v))
        res = epsilons([(1.0, 0.01, 10)], DELTA)
    finally:
        accounting._FUNCS.clear()
        accounting._FUNCS.update(saved)
    ok = {k: v for k, v in fakes.items() if v is not None}
    assert res["headline"]["epsilon"] == min(ok.values())
    assert fakes[res["headline"]["accountant"]] == min(ok.values())
    for name, value in fakes.items():
        assert res["accountants"][name]["epsilon"] == value
        assert (res["accountants"][name]["error"] is None) == (value is not None)


@pytest.mark.parametrize("history", [[], [(1.0, 0.01, 0)], [(0.5, 0.2, 0), (2.0, 0.1, 0)]])
def test_no_steps_cost_nothing(history):
    res = epsilons(history, DELTA)
    assert res["headline"]["epsilon"] == 0.0
    assert all(v == {"epsilon": 0.0, "error": None} for v in res["accountants"].values())
    assert res["flags"] == []


def test_zero_noise_is_infinite_epsilon():
    res = epsilons([(0.0, 0.01, 5)], DELTA)
    assert res["headline"]["epsilon"] == math.inf


@pytest.mark.parametrize("history,delta,match", [
    ([(1.0, 0.01, 10)], 0.0, "delta"),
    ([(1.0, 0.01, 10)], 1.0, "delta"),
    ([(-1.0, 0.01, 10)], DELTA, "noise multiplier"),
    ([(1.0, 0.0, 10)], DELTA, "sampling rate"),
    ([(1.0, 1.5, 10)], DELTA, "sampling rate"),
    ([(1.0, 0.01, -1)], DELTA, "steps"),
    ([(1.0, 0.01, 2.5)], DELTA, "steps"),
])
def test_bad_histories_are_config_errors(history, delta, match):
    with pytest.raises(ConfigError, match=match):
        epsilons(history, delta)


def test_ledger_without_a_formal_guarantee_gets_no_epsilon():
    ledger = PrivacyLedger(mechanism="dp-sgd", formal_guarantee=False, note="no formal DP guarantee: x",
                           delta=DELTA, clients={"0": {"n": 100}})
    ledger.record(DPEvent(0, 0, 0.1, 1.0, 10, "median-nonprivate", "full", "ghost", 1.0, 1.0))
    out = ledger_epsilons(ledger.to_json())
    assert out["clients"] == {} and out["formal_guarantee"] is False
    assert "no formal DP guarantee" in out["epsilon_withheld"]


def test_ledger_epsilons_compose_each_clients_events():
    ledger = PrivacyLedger(mechanism="dp-sgd", formal_guarantee=True, note="dp", delta=DELTA,
                           clients={"0": {"n": 100}, "1": {"n": 100}})
    for rnd in range(2):
        ledger.record(DPEvent(0, rnd, 0.05, 1.2, 20, "fixed", "full", "ghost", 1.0, 1.0))
    ledger.record(DPEvent(1, 0, 0.05, 1.2, 20, "fixed", "full", "ghost", 1.0, 1.0))
    out = ledger_epsilons(PrivacyLedger.from_json(ledger.to_json()).to_json())
    assert out["clients"]["0"]["relations"]["add-remove"] == epsilons([(1.2, 0.05, 20), (1.2, 0.05, 20)], DELTA)
    assert set(out["clients"]) == {"0", "1"} and out["delta"] == DELTA
    assert out["clients"]["0"]["headline"]["epsilon"] > out["clients"]["1"]["headline"]["epsilon"]
    # the run's headline: the largest client under replace-one, and the largest under add/remove
    assert out["relation"] == "replace-one" and "record count" in out["relation_reason"]
    assert out["headline"] == {"relation": "replace-one", "epsilon": out["clients"]["0"]["headline"]["epsilon"],
                               "client": "0", "delta": DELTA, "unaccounted_clients": [],
                               "add_remove_epsilon": out["clients"]["0"]["relations"]["add-remove"]["headline"][
                                   "epsilon"]}


# ------------------------------------------------------------------ calibration
@settings(max_examples=4, deadline=None)
@given(st.floats(0.5, 8.0), st.floats(0.005, 0.1), st.integers(10, 1000), st.sampled_from([1e-5, 1e-6]))
def test_calibrated_sigma_meets_its_target_under_the_headline_relation(target, q, steps, delta):
    """The budget is held under replace-one, the headline's relation: the calibrated sigma's replace-one epsilon
    (by the calibration's accountant, and by the reports' headline on a finer grid) is <= the target and close
    to it; add/remove, the smaller, lies below."""
    spec = PrivacySpec(mechanism="dp-sgd", target_epsilon=target, delta=delta).validate()
    sigma = calibrate_noise(spec, q, steps)
    spent = spent_epsilon(spec, [(sigma, q, steps)])
    assert target - EPSILON_TOLERANCE <= spent <= target, (sigma, spent)
    both = client_epsilons([(sigma, q, steps)], delta)
    assert both["headline"]["relation"] == "replace-one"
    assert target - 0.05 <= both["headline"]["epsilon"] <= target, (sigma, both["headline"])
    assert both["relations"]["add-remove"]["headline"]["epsilon"] < both["headline"]["epsilon"]


def test_calibration_by_group_privacy_rdp_is_looser_but_meets_the_target():
    """rdp bounds replace-one through group privacy: always computable, more noise for the same target."""
    rdp = PrivacySpec(mechanism="dp-sgd", target_epsilon=3.0, delta=1e-5, calibration_accountant="rdp").validate()
    sigma = calibrate_noise(rdp, 0.02, 500)
    assert 3.0 - EPSILON_TOLERANCE <= spent_epsilon(rdp, [(sigma, 0.02, 500)]) <= 3.0
    assert client_epsilons([(sigma, 0.02, 500)], 1e-5)["headline"]["epsilon"] <= 3.0
    pld_sigma = calibrate_noise(PrivacySpec(mechanism="dp-sgd", target_epsilon=3.0, delta=1e-5).validate(), 0.02, 500)
    assert pld_sigma < sigma


def test_a_budget_that_cannot_be_met_is_refused_in_one_line():
    spec = PrivacySpec(mechanism="dp-sgd", target_epsilon=1e-6, delta=1e-5).validate()
    with pytest.raises(ConfigError, match="cannot be met") as err:
        calibrate_noise(spec, 0.5, 10_000)
    assert "\n" not in str(err.value)


def test_an_explicit_noise_multiplier_is_used_as_is():
    spec = PrivacySpec(mechanism="dp-sgd", noise_multiplier=1.234).validate()
    assert calibrate_noise(spec, 0.1, 100) == 1.234


def test_an_impossible_budget_is_refused_with_its_numbers():
    """epsilon=1e-4 at delta=1e-5 is below what RDP can certify at any sigma (its floor is ~0.103).
    The sampling rate is 1 (batch >= n) rather than e.g. 0.5 only for speed: Opacus's search
    doubles sigma up to 1e6 and subsampled RDP at huge sigma takes ~35 s to refuse on busy cores."""
    spec = PrivacySpec(mechanism="dp-sgd", target_epsilon=1e-4, delta=1e-5).validate()
    with pytest.raises(ConfigError) as info:
        calibrate_noise(spec, 1.0, 10000)
    msg = str(info.value)
    assert "\n" not in msg
    for number in ("epsilon=0.0001", "delta=1e-05", "sampling rate 1 ", "10000 steps", "cannot be met"):
        assert number in msg, msg


def test_adaptive_clipping_needs_sigma_below_twice_the_count_noise():
    spec = PrivacySpec(mechanism="dp-sgd", noise_multiplier=5.0, unclipped_num_std=2.0).validate()
    with pytest.raises(ConfigError, match=r"sigma=5 >= 2 \* 2"):
        check_adaptive(spec, 5.0, 2.0)
    check_adaptive(spec, 3.99, 2.0)  # allowed
    fixed = PrivacySpec(mechanism="dp-sgd", noise_multiplier=5.0, clipping="fixed").validate()
    check_adaptive(fixed, 5.0, 2.0)  # the rule only binds adaptive clipping


# ------------------------------------------------------------------ resources: every call finishes, PLD an upper bound
@pytest.mark.parametrize("q, sigma, steps", [(0.5, 0.3, 10_000), (1.0, 0.3, 1000), (0.01, 0.3, 100_000)])
def test_accounting_never_hangs_or_runs_out_of_memory(q, sigma, steps, capsys):
    """Settings that once took gigabytes or minutes through the epsilon command (and the same code at the end of
    a run): each finishes well within 30 s, both relations. PRV is skipped by its grid bound and says why, PLD
    runs on a coarser grid and says which, and each headline is still an accountant's upper bound (the tightest
    that ran)."""
    started = time.perf_counter()
    assert main(["epsilon", "--sampling-rate", str(q), "--noise-multiplier", str(sigma), "--steps", str(steps),
                 "--delta", "1e-5", "--json"]) == 0
    elapsed = time.perf_counter() - started
    assert elapsed < 30, f"took {elapsed:.1f} s"
    both = json.loads(capsys.readouterr().out)
    res = both["relations"]["add-remove"]
    acc = res["accountants"]
    assert acc["opacus_prv"]["epsilon"] is None and acc["opacus_prv"]["error"].startswith("not computed: its grid")
    assert any(n.startswith("dp_accounting_pld: grid ") and "still an upper bound" in n for n in res["notes"])
    assert any("opacus_prv not computed" in n for n in res["notes"])
    values = {k: v["epsilon"] for k, v in acc.items() if v["epsilon"] is not None}
    assert set(values) == {"opacus_rdp", "dp_accounting_rdp", "dp_accounting_pld"}
    assert all(math.isfinite(v) and v > 0 for v in values.values())
    assert res["headline"] == {"accountant": min(values, key=values.get), "epsilon": min(values.values())}
    replace_one = both["relations"]["replace-one"]["accountants"]  # the headline relation: PLD and RDP both ran
    assert all(math.isfinite(r["epsilon"]) for r in replace_one.values())
    assert both["headline"]["epsilon"] == min(r["epsilon"] for r in replace_one.values())


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism with sensitivity / noise = mu at delta (Balle and Wang 2018):
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), solved for eps in log space."""
    def excess(eps):
        return math.exp(special.log_ndtr(-eps / mu + mu / 2)) - math.exp(eps + special.log_ndtr(-eps / mu - mu / 2)) \
            - delta
    return optimize.brentq(excess, 0.0, mu * mu + 50 * mu, xtol=1e-12, rtol=1e-14)


@pytest.mark.parametrize("relation", ["add-remove", "replace-one"])
@pytest.mark.parametrize("sigma, steps", [(0.3, 1000), (2.0, 50)])
@pytest.mark.parametrize("points", [None, 2 ** 12])
def test_a_coarser_pld_grid_is_still_an_upper_bound_on_the_exact_epsilon(sigma, steps, points, relation,
                                                                        monkeypatch):
    """q = 1: T Gaussian steps are one Gaussian mechanism with mu = sqrt(T) / sigma (twice that under
    replace-one: one record's clipped gradient swapped for the opposite one), whose epsilon is known exactly.
    PLD on its default bounds and on a grid forced far coarser (2^12 points) never falls below it."""
    if points:
        monkeypatch.setattr(accountants, "PLD_POINTS", points)
    exact = _gaussian_epsilon((2 if relation == "replace-one" else 1) * math.sqrt(steps) / sigma, DELTA)
    eps, note = accountants.dp_accounting_pld([(sigma, 1.0, steps)], DELTA, relation)
    assert eps >= exact * (1 - 1e-12), (eps, exact)
    if points or sigma == 0.3:
        assert note and note.startswith("grid ")
    if note:
        interval = float(note.split()[1])
        assert eps <= exact + steps * interval  # pessimistic rounding costs at most one grid step per step
    if not points:
        assert eps == pytest.approx(exact, rel=1e-3)


def test_a_coarser_subsampled_pld_stays_above_the_optimistic_estimate(monkeypatch):
    """q < 1: dp-accounting's optimistic PLD (privacy buckets, rounding down) on the fine grid is below the true
    epsilon; the pessimistic PLD on a grid forced coarse must stay above it."""
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    sigma, q, steps = 2.0, 0.1, 500
    optimistic = pld_lib.from_gaussian_mechanism(sigma, sampling_prob=q, pessimistic_estimate=False,
                                                 use_connect_dots=False, value_discretization_interval=3e-4)
    low = optimistic.self_compose(steps).get_epsilon_for_delta(DELTA)
    fine, note = accountants.dp_accounting_pld([(sigma, q, steps)], DELTA)
    monkeypatch.setattr(accountants, "PLD_POINTS", 2 ** 10)
    coarse, coarse_note = accountants.dp_accounting_pld([(sigma, q, steps)], DELTA)
    assert note is None and coarse_note.startswith("grid ")
    assert low <= fine <= low * 1.02  # the two estimates bracket the true epsilon tightly
    assert coarse >= low and coarse > fine


def test_pld_and_prv_give_up_with_a_note_and_rdp_takes_over(monkeypatch):
    """Nine different mechanisms are more than PLD discretizes (8); a PRV grid over its bound is not built."""
    monkeypatch.setattr(accountants, "PRV_POINTS", 1000)
    history = [(1.0 + i / 10, 0.01, 100) for i in range(9)]
    res = epsilons(history, DELTA)
    assert res["accountants"]["dp_accounting_pld"] == {
        "epsilon": None, "error": "not computed: 9 different (sigma, q) to discretize (limit 8)"}
    assert res["accountants"]["opacus_prv"]["error"].startswith("not computed: its grid would need")
    assert res["headline"]["accountant"] in RDP
    assert res["notes"] == ["opacus_prv and dp_accounting_pld not computed (see its error): the headline is the "
                            "tightest of dp_accounting_rdp, opacus_rdp"]


def test_identical_mechanisms_compose_as_one():
    """A ledger lists one event per round; the accountants get each distinct mechanism once, steps summed."""
    assert accounting.merged_history([(1.2, 0.05, 20), (0.9, 0.1, 0), (1.2, 0.05, 30), (1.0, 0.05, 5)]) == [
        (1.2, 0.05, 50), (1.0, 0.05, 5)]


# ------------------------------------------------------------------ both neighbouring relations
def test_each_relation_has_its_own_accountants_and_the_headline_is_replace_one():
    """Replace-one by dp-accounting's PLD with NeighboringRelation.REPLACE_ONE and by RDP through group privacy
    (a looser upper bound); add/remove by all four. Each PLD is the number dp-accounting's own PLDAccountant
    gives for that relation (our composition adds only the resource bounds, not hit here)."""
    from dp_accounting import privacy_accountant
    from dp_accounting.pld import pld_privacy_accountant

    history = [(2.0, 0.05, 300)]
    res = client_epsilons(history, DELTA)
    assert list(res["relations"]) == list(RELATIONS) == ["replace-one", "add-remove"]
    neighbours = {"replace-one": privacy_accountant.NeighboringRelation.REPLACE_ONE,
                  "add-remove": privacy_accountant.NeighboringRelation.ADD_OR_REMOVE_ONE}
    for relation, names in RELATIONS.items():
        rel = res["relations"][relation]
        assert rel["relation"] == relation and set(rel["accountants"]) == set(names)
        assert all(r["error"] is None for r in rel["accountants"].values())
        assert rel["flags"] == [] and rel["notes"] == []
        acc = pld_privacy_accountant.PLDAccountant(neighbours[relation],
                                                   value_discretization_interval=accountants.PLD_DISCRETIZATION)
        acc.compose(accountants.dp_event_of(history))
        assert rel["accountants"]["dp_accounting_pld"]["epsilon"] == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    replace_one, add_remove = res["relations"]["replace-one"], res["relations"]["add-remove"]
    assert res["headline"] == {"relation": "replace-one", **replace_one["headline"]}
    pld = replace_one["accountants"]["dp_accounting_pld"]["epsilon"]
    assert replace_one["headline"]["accountant"] == "dp_accounting_pld"
    assert replace_one["accountants"]["dp_accounting_rdp_replace_one"]["epsilon"] > pld
    assert pld > add_remove["headline"]["epsilon"]  # swapping a record moves the sum further than adding one


@pytest.mark.parametrize("sigma, steps", [(2.0, 50), (1.0, 10)])
def test_replace_one_by_group_privacy_is_an_upper_bound(sigma, steps):
    """q = 1, where replace-one epsilon is known exactly (mu = 2 sqrt(T) / sigma): RDP through group privacy
    (Mironov 2017, Prop. 2) stays above it, as every accountant must."""
    exact = _gaussian_epsilon(2 * math.sqrt(steps) / sigma, DELTA)
    with accounting._quiet():
        group = accountants.dp_accounting_rdp_replace_one([(sigma, 1.0, steps)], DELTA)
    assert exact <= group < 3 * exact


def test_without_pld_replace_one_falls_back_to_rdp_with_a_note(monkeypatch):
    monkeypatch.setattr(accountants, "PLD_MECHANISMS", 0)
    res = epsilons([(1.0, 0.01, 1000)], DELTA, "replace-one")
    assert res["accountants"]["dp_accounting_pld"]["error"] == ("not computed: 1 different (sigma, q) to "
                                                                "discretize (limit 0)")
    assert res["headline"] == {"accountant": "dp_accounting_rdp_replace_one",
                               "epsilon": res["accountants"]["dp_accounting_rdp_replace_one"]["epsilon"]}
    assert res["notes"] == ["dp_accounting_pld not computed (see its error): the headline is the tightest of "
                            "dp_accounting_rdp_replace_one"]
    with pytest.raises(ConfigError, match="relation must be one of replace-one, add-remove"):
        epsilons([(1.0, 0.01, 10)], DELTA, "swap")


def test_privacy_blocks_written_before_both_relations_still_read():
    """A run recorded before both relations (tests/data/run-v1: add/remove only) reads as add/remove, named so;
    a block without a formal guarantee or an accounted client has no run epsilon."""
    from pathlib import Path

    old = json.loads((Path(__file__).with_name("data") / "run-v1" / "metrics.json").read_text())["privacy"]
    top = run_epsilon(old)
    values = {cid: c["headline"]["epsilon"] for cid, c in old["clients"].items()}
    assert top == {"relation": "add-remove", "epsilon": max(values.values()), "client": max(values, key=values.get),
                   "add_remove_epsilon": max(values.values()), "delta": old["delta"], "unaccounted_clients": []}
    assert run_epsilon({"formal_guarantee": False, "clients": {}}) is None
    assert run_epsilon({"formal_guarantee": True, "clients": {}, "unaccounted": {"0": "unreadable"}}) is None
