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

import math

import pytest
from hypothesis import given, settings, strategies as st
from opacus.accountants import create_accountant

from alignfl_audit import accounting
from alignfl_audit.accounting import ACCOUNTANTS, PRV_EPS_ERROR, epsilons, ledger_epsilons
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
        return accounting._FUNCS[name]([(sigma, q, steps)], DELTA)


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
    assert out["clients"]["0"] == epsilons([(1.2, 0.05, 20), (1.2, 0.05, 20)], DELTA)
    assert set(out["clients"]) == {"0", "1"} and out["delta"] == DELTA
    assert out["clients"]["0"]["headline"]["epsilon"] > out["clients"]["1"]["headline"]["epsilon"]


# ------------------------------------------------------------------ calibration
def calibration_epsilon(accountant: str, sigma: float, q: float, steps: int, delta: float) -> float:
    acc = create_accountant(accountant)
    acc.history = [(sigma, q, steps)]
    return float(acc.get_epsilon(delta=delta))


@settings(max_examples=6, deadline=None)
@given(st.floats(0.5, 8.0), st.floats(0.005, 0.1), st.integers(10, 1000), st.sampled_from([1e-5, 1e-6]))
def test_calibrated_sigma_meets_its_target_epsilon(target, q, steps, delta):
    """epsilon(sigma) by the calibration accountant (RDP) is <= the target and within 0.05 of it."""
    spec = PrivacySpec(mechanism="dp-sgd", target_epsilon=target, delta=delta).validate()
    sigma = calibrate_noise(spec, q, steps)
    eps = calibration_epsilon("rdp", sigma, q, steps, delta)
    assert target - 0.05 <= eps <= target, (sigma, eps)
    assert spent_epsilon(spec, [(sigma, q, steps)]) == pytest.approx(eps)
    # ... and the headline over all four accountants can only be tighter
    assert epsilons([(sigma, q, steps)], delta)["headline"]["epsilon"] <= eps + 1e-9


def test_calibration_with_the_prv_accountant():
    spec = PrivacySpec(mechanism="dp-sgd", target_epsilon=3.0, delta=1e-5, calibration_accountant="prv").validate()
    sigma = calibrate_noise(spec, 0.02, 500)
    eps = calibration_epsilon("prv", sigma, 0.02, 500, 1e-5)
    assert 3.0 - 0.05 <= eps <= 3.0 + EPSILON_TOLERANCE
    # PRV is tighter than RDP, so it needs less noise for the same target
    rdp_sigma = calibrate_noise(PrivacySpec(mechanism="dp-sgd", target_epsilon=3.0, delta=1e-5).validate(), 0.02, 500)
    assert sigma < rdp_sigma


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
