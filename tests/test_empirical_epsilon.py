"""Empirical epsilon lower bounds (attacks.empirical_epsilon) and the `empirical-epsilon` command.

The bounds must be valid first: no bound from an attack that cannot tell members from
non-members, rates counted over the right population, and p-values that really are <= beta.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

from alignfl_audit.cli import main
from attacks.empirical_epsilon import (clopper_pearson_ceiling, clopper_pearson_epsilon, clopper_pearson_upper,
                                       load_scores, one_run_ceiling, one_run_epsilon, one_run_p_value)
from federation.errors import ConfigError

SELECTIONS = ("split", "bonferroni")
finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


# --------------------------------------------------------------------------- Clopper-Pearson: null

@settings(max_examples=60, deadline=None)
@given(scores=st.lists(finite | st.sampled_from([0.0, 1.0]), min_size=2, max_size=80),
       delta=st.sampled_from([0.0, 1e-5, 0.1]), seed=st.integers(0, 2**16), selection=st.sampled_from(SELECTIONS))
def test_identical_scores_give_exactly_zero(scores, delta, seed, selection):
    a = np.array(scores)
    res = clopper_pearson_epsilon(a, a.copy(), delta, seed=seed, selection=selection)
    assert res["epsilon_lb"] == 0.0
    assert res["fpr_ub"] + res["fnr_ub"] >= 1.0


@pytest.mark.parametrize("selection", SELECTIONS)
def test_one_distribution_gives_zero_for_a_fixed_seed(selection):
    rng = np.random.default_rng(7)
    res = clopper_pearson_epsilon(rng.normal(size=500), rng.normal(size=300), 1e-5, selection=selection)
    assert res["epsilon_lb"] == 0.0


def test_one_distribution_false_positive_rate_is_at_most_alpha():
    # Under the null (members and non-members from one distribution, fresh data per trial) each
    # trial gives epsilon_lb > 0 with probability <= alpha, so the number of positives X over
    # 200 independent trials is stochastically below Binomial(200, alpha). The slack is the
    # count c with P[Binomial(200, alpha) > c] < 1e-3: a valid procedure fails this rarely.
    alpha, trials = 0.05, 200
    c = _null_slack(trials, alpha)
    positives = 0
    for seed in range(trials):
        rng = np.random.default_rng(10_000 + seed)
        res = clopper_pearson_epsilon(rng.normal(size=120), rng.normal(size=120), 0.0, alpha=alpha, seed=seed)
        positives += res["epsilon_lb"] > 0
    assert positives <= c, f"{positives} of {trials} null trials gave a positive bound (allowed {c})"


def _null_slack(trials, level):
    """Largest count of failures tolerated when each of `trials` independent trials fails with
    probability <= level: P[Binomial(trials, level) > c] < 1e-3."""
    return int(stats.binom.isf(1e-3, trials, level))


@pytest.mark.parametrize("selection", SELECTIONS)
def test_bound_stays_below_the_true_epsilon_of_randomized_response(selection):
    # Randomized response is exactly eps-DP (delta = 0): a member's bit is 1 with probability
    # e^eps/(1+e^eps), a non-member's with 1/(1+e^eps). A valid bound exceeds eps in at most an
    # alpha fraction of experiments.
    eps_true, alpha, trials = 1.0, 0.05, 150
    p = special.expit(eps_true)
    over = 0
    for seed in range(trials):
        rng = np.random.default_rng(20_000 + seed)
        members, nonmembers = (rng.random(600) < p).astype(float), (rng.random(600) < 1 - p).astype(float)
        res = clopper_pearson_epsilon(members, nonmembers, 0.0, alpha=alpha, selection=selection, seed=seed)
        over += res["epsilon_lb"] > eps_true
    assert over <= _null_slack(trials, alpha)


# --------------------------------------------------------------------------- Clopper-Pearson: rates

def test_rates_are_over_the_right_population_fixed_threshold():
    members = np.arange(1, 11) / 10.0                     # 10 members: 0.1 .. 1.0
    nonmembers = np.r_[np.zeros(36), [0.6, 0.7, 0.8, 0.9]]  # 40 non-members, 4 of them above 0.55
    res = clopper_pearson_epsilon(members, nonmembers, 0.0, alpha=0.1, threshold=0.55)
    # member iff score >= 0.55: members 0.1..0.5 are missed (5 of 10); 4 of 40 non-members flagged
    assert res["fnr"] == 5 / 10
    assert res["fpr"] == 4 / 40
    assert (res["n_members_eval"], res["n_nonmembers_eval"], res["selection"]) == (10, 40, "fixed")
    assert res["fpr_ub"] == pytest.approx(stats.beta.ppf(1 - 0.05, 4 + 1, 40 - 4), rel=1e-12)
    assert res["fnr_ub"] == pytest.approx(stats.beta.ppf(1 - 0.05, 5 + 1, 10 - 5), rel=1e-12)
    expected = max(math.log((1 - res["fnr_ub"]) / res["fpr_ub"]), math.log((1 - res["fpr_ub"]) / res["fnr_ub"]), 0)
    assert res["epsilon_lb"] == pytest.approx(expected, rel=1e-12)


def test_rates_are_over_the_right_population_after_the_split():
    rng = np.random.default_rng(3)
    members, nonmembers = rng.normal(1.0, 1.0, size=10), rng.normal(0.0, 1.0, size=40)
    res = clopper_pearson_epsilon(members, nonmembers, 0.0, seed=5)
    assert (res["n_members_eval"], res["n_nonmembers_eval"]) == (5, 20)
    # the documented split: each side shuffled by default_rng(seed), the second half evaluates
    eval_m = members[np.random.default_rng(5).permutation(10)][5:]
    eval_n = nonmembers[np.random.default_rng(5).permutation(40)][20:]
    t = res["threshold"]
    assert res["fnr"] == np.count_nonzero(eval_m < t) / 5
    assert res["fpr"] == np.count_nonzero(eval_n >= t) / 20


# --------------------------------------------------------------------------- Clopper-Pearson: signal

def test_perfect_separation_matches_hand_computation_and_grows_with_n():
    alpha, delta, prev = 0.05, 1e-5, 0.0
    for n in (20, 100, 1000, 5000):
        rng = np.random.default_rng(n)
        res = clopper_pearson_epsilon(10 + rng.random(n), rng.random(n), delta, alpha=alpha)
        n_eval = n - n // 2
        ub = 1 - (alpha / 2) ** (1 / n_eval)  # CP upper bound for 0 errors out of n_eval
        assert (res["fpr"], res["fnr"]) == (0.0, 0.0)
        assert 1 <= res["threshold"] <= 10
        assert res["fpr_ub"] == pytest.approx(ub, rel=1e-9) and res["fnr_ub"] == pytest.approx(ub, rel=1e-9)
        assert res["epsilon_lb"] == pytest.approx(math.log((1 - delta - ub) / ub), rel=1e-9)
        assert prev < res["epsilon_lb"] < math.log(n) + 0.01
        prev = res["epsilon_lb"]


@pytest.mark.parametrize("selection", SELECTIONS)
def test_the_ceiling_is_reached_by_perfect_separation_and_never_exceeded(selection):
    alpha, delta = 0.05, 1e-5
    rng = np.random.default_rng(5)
    perfect = clopper_pearson_epsilon(10 + rng.random(300), rng.random(300), delta, selection=selection)
    assert perfect["epsilon_lb"] == pytest.approx(perfect["epsilon_ceiling"], rel=1e-12)
    assert perfect["epsilon_ceiling"] == clopper_pearson_ceiling(150, 150, delta, alpha, perfect["n_candidates"])
    for shift in (0.0, 0.5, 2.0):  # an imperfect attack stays below the same counts' ceiling
        res = clopper_pearson_epsilon(rng.normal(shift, 1, 300), rng.normal(0, 1, 300), delta, selection=selection)
        assert res["epsilon_lb"] < res["epsilon_ceiling"]
        assert res["epsilon_ceiling"] == clopper_pearson_ceiling(150, 150, delta, alpha, res["n_candidates"])


def test_clopper_pearson_ceiling_rejects_bad_input():
    for args, message in (((0, 5, 0.0, 0.05), "n_members"), ((5, 5, 1.0, 0.05), "delta"),
                          ((5, 5, 0.0, 1.0), "alpha"), ((5, 5, 0.0, 0.05, 0), "n_candidates")):
        with pytest.raises(ConfigError, match=message) as err:
            clopper_pearson_ceiling(*args)
        assert "\n" not in str(err.value)


def test_bonferroni_pays_for_its_candidates_but_finds_a_real_signal():
    rng = np.random.default_rng(11)
    members, nonmembers = rng.normal(2.0, 1.0, 2000), rng.normal(0.0, 1.0, 2000)
    split = clopper_pearson_epsilon(members, nonmembers, 1e-5)
    bonf = clopper_pearson_epsilon(members, nonmembers, 1e-5, selection="bonferroni")
    assert split["epsilon_lb"] > 0.5 and bonf["epsilon_lb"] > 0.5
    assert bonf["n_candidates"] > 1 and split["n_candidates"] == 1
    # with a single candidate (the split's pick) Bonferroni is exactly the split
    single = clopper_pearson_epsilon(members, nonmembers, 1e-5, selection="bonferroni", n_thresholds=1)
    assert single["epsilon_lb"] == split["epsilon_lb"]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 400), data=st.data(), alpha=st.floats(1e-4, 0.5))
def test_clopper_pearson_upper_bound_properties(n, data, alpha):
    k = data.draw(st.integers(0, n))
    ub = clopper_pearson_upper(k, n, alpha)
    assert k / n <= ub <= 1.0
    if k == n:
        assert ub == 1.0
    else:
        assert clopper_pearson_upper(k + 1, n, alpha) >= ub     # more errors, higher bound
        assert clopper_pearson_upper(k, n, alpha / 2) >= ub     # more confidence, higher bound
    if k == 0:
        assert ub == pytest.approx(1 - alpha ** (1 / n), rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 150), p=st.floats(0.001, 0.999), alpha=st.sampled_from([0.01, 0.05, 0.2]))
def test_clopper_pearson_upper_bound_coverage_is_exact(n, p, alpha):
    # P_p[ub(K) >= p] over K ~ Binomial(n, p), computed exactly, is at least 1 - alpha
    ks = np.arange(n + 1)
    covered = clopper_pearson_upper(ks, n, alpha) >= p
    assert stats.binom.pmf(ks, n, p)[covered].sum() >= 1 - alpha - 1e-9


@pytest.mark.parametrize("kwargs, message", [
    ({"member_scores": []}, "at least 2"),
    ({"member_scores": [1.0, float("nan"), 2.0]}, "non-finite"),
    ({"nonmember_scores": [1.0, float("inf")]}, "non-finite"),
    ({"member_scores": np.zeros((3, 2))}, "1-D"),
    ({"member_scores": ["a", "b"]}, "real numbers"),
    ({"delta": 1.0}, "delta must be in [0, 1)"),
    ({"delta": -1e-9}, "delta must be in [0, 1)"),
    ({"alpha": 0.0}, "alpha must be in (0, 1)"),
    ({"alpha": 1.0}, "alpha must be in (0, 1)"),
    ({"selection": "best"}, "selection must be one of"),
    ({"threshold": float("nan")}, "threshold must be a finite number"),
])
def test_clopper_pearson_rejects_bad_input(kwargs, message):
    args = {"member_scores": [1.0, 2.0, 3.0], "nonmember_scores": [0.0, 1.0], "delta": 1e-5, **kwargs}
    with pytest.raises(ConfigError) as err:
        clopper_pearson_epsilon(**args)
    assert message in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- one run

def _p_value_by_hand(m, r, v, eps, delta):
    """The one-run p-value written out term by term, independently of the module's vectorization."""
    q = math.exp(eps) / (1 + math.exp(eps))
    tail = sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(v, r + 1))
    best = 0.0
    for i in range(1, v + 1):
        mass = sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(v - i, v))
        best = max(best, mass / i)
    return min(tail + 2 * m * delta * best, 1.0)


def _canaries(m, seed, noise):
    """m canaries included with probability 1/2; score = inclusion + noise * N(0, 1), or pure
    noise unrelated to inclusion when ``noise`` is None."""
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    return (included + noise * rng.normal(size=m) if noise is not None else rng.normal(size=m)), included


def test_one_run_all_correct_is_positive_grows_with_r_and_matches_closed_form():
    scores, included = _canaries(2000, 0, noise=0.01)  # noise far below the 0/1 gap: every guess right
    prev, beta = 0.0, 0.05
    for r in (10, 50, 200, 800):
        res = one_run_epsilon(scores, included, r // 2, r // 2, 0.0, beta=beta)
        assert (res["r"], res["v"]) == (r, r)
        # delta = 0, all r right: p(eps) = q^r, so the bound solves q^r = beta
        assert res["epsilon_lb"] == pytest.approx(special.logit(beta ** (1 / r)), abs=1e-9)
        assert res["epsilon_lb"] > prev
        prev = res["epsilon_lb"]


@pytest.mark.parametrize("m, r", [(100, 40), (1000, 400), (200, 80), (10, 2)])
@pytest.mark.parametrize("delta", [0.0, 1e-5])
def test_one_run_ceiling_is_what_every_guess_right_gives(m, r, delta):
    beta = 0.05
    scores, included = _canaries(m, 4, noise=0.01)
    res = one_run_epsilon(scores, included, r // 2, r - r // 2, delta, beta=beta)
    assert res["v"] == r and res["epsilon_lb"] == res["epsilon_ceiling"] == one_run_ceiling(m, r, delta, beta)
    if delta == 0:
        # r <= log(beta) / log(1/2) guesses cannot prove anything: the ceiling is 0, never negative
        assert res["epsilon_ceiling"] == pytest.approx(max(0.0, special.logit(beta ** (1 / r))), abs=1e-9)
    else:  # the 2 m delta term only lowers it
        assert res["epsilon_ceiling"] <= one_run_ceiling(m, r, 0.0, beta)
    noisy = one_run_epsilon(*_canaries(m, 5, noise=1.0), r // 2, r - r // 2, delta, beta=beta)
    assert noisy["epsilon_lb"] <= noisy["epsilon_ceiling"] == res["epsilon_ceiling"]


@pytest.mark.parametrize("args, message", [
    ((1, 1, 0.0), "canaries (m) must be an integer >= 2"),
    ((10, 0, 0.0), "guesses (r) must be an integer >= 1"),
    ((10, 11, 0.0), "cannot exceed the canaries"),
    ((10, 4, 0.0, 1.5), "beta must be in (0, 1)"),
    ((10, 4, -0.1), "delta must be in [0, 1)"),
])
def test_one_run_ceiling_rejects_bad_input(args, message):
    with pytest.raises(ConfigError) as err:
        one_run_ceiling(*args)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_one_run_scores_independent_of_inclusion_give_zero():
    scores, included = _canaries(1000, 1, noise=None)
    res = one_run_epsilon(scores, included, 100, 100, 1e-5)
    assert res["epsilon_lb"] == 0.0 and res["r"] == 200


def test_one_run_ties_are_not_broken_by_array_order():
    # a caller that sorted the canaries by inclusion must not turn constant scores into a signal
    included = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    res = one_run_epsilon(np.zeros(200), included, 50, 50, 0.0)
    assert res["epsilon_lb"] == 0.0


def test_one_run_bound_stays_below_the_true_epsilon_of_randomized_response():
    # each canary's score is its inclusion bit passed through eps-DP randomized response; the
    # bound may exceed eps in at most a beta fraction of runs (here the test is nearly exact)
    eps_true, beta, trials, m = 1.0, 0.05, 150, 1000
    over = 0
    for seed in range(trials):
        rng = np.random.default_rng(30_000 + seed)
        included = rng.random(m) < 0.5
        scores = np.where(rng.random(m) < special.expit(eps_true), included, ~included).astype(float)
        over += one_run_epsilon(scores, included, 250, 250, 0.0, beta=beta, seed=seed)["epsilon_lb"] > eps_true
    assert over <= _null_slack(trials, beta)


@pytest.mark.parametrize("noise", [0.3, 1.0, 3.0])
@pytest.mark.parametrize("k", [(20, 20), (100, 0), (60, 140)])
def test_one_run_delta_never_helps_and_the_p_value_holds(noise, k):
    m, beta = 400, 0.05
    scores, included = _canaries(m, 2, noise=noise)
    pure = one_run_epsilon(scores, included, *k, 0.0, beta=beta)
    for delta in (1e-6, 1e-4, 1e-3):
        approx = one_run_epsilon(scores, included, *k, delta, beta=beta)
        assert approx["epsilon_lb"] <= pure["epsilon_lb"]
        assert (approx["r"], approx["v"]) == (pure["r"], pure["v"])
    assert pure["epsilon_lb"] > 0 or noise == 3.0  # the weak attack may prove nothing
    for res in (pure, approx):
        eps, delta = res["epsilon_lb"], res["delta"]
        args = (m, res["r"], res["v"], eps, delta)
        if eps > 0:  # a positive bound is rejected at its own value ...
            assert one_run_p_value(*args) <= beta
            assert _p_value_by_hand(*args) <= beta + 1e-12
        # ... and, bisection being tight, no longer a little above it
        assert one_run_p_value(m, res["r"], res["v"], eps + 1e-6, delta) > beta - 1e-12


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 60), data=st.data(), eps=st.floats(0.0, 8.0), delta=st.sampled_from([0.0, 1e-5, 1e-3]))
def test_one_run_p_value_matches_the_formula(r, data, eps, delta):
    v = data.draw(st.integers(0, r))
    m = data.draw(st.integers(r, 3 * r))
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(_p_value_by_hand(m, r, v, eps, delta),
                                                                 rel=1e-7, abs=1e-12)
    if delta == 0:
        assert one_run_p_value(m, r, v, eps, 0.0) == pytest.approx(stats.binom.sf(v - 1, r, special.expit(eps)),
                                                                   rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("kwargs, message", [
    ({"k_pos": 6, "k_neg": 5}, "exceeds the number of canaries"),
    ({"included": np.ones(9, bool)}, "as long as canary_scores"),
    ({"included": np.full(10, 2)}, "booleans"),
    ({"k_pos": -1}, "k_pos must be an integer"),
    ({"k_neg": 1.5}, "k_neg must be an integer"),
    ({"canary_scores": np.r_[np.zeros(9), np.nan]}, "non-finite"),
    ({"canary_scores": []}, "at least 1"),
    ({"delta": 1.0}, "delta must be in [0, 1)"),
    ({"beta": 0.0}, "beta must be in (0, 1)"),
])
def test_one_run_rejects_bad_input(kwargs, message):
    args = {"canary_scores": np.arange(10.0), "included": np.arange(10) % 2 == 0, "k_pos": 3, "k_neg": 3,
            "delta": 0.0, **kwargs}
    if "canary_scores" in kwargs and len(kwargs["canary_scores"]) == 0:
        args["included"] = np.zeros(0, bool)
    with pytest.raises(ConfigError) as err:
        one_run_epsilon(**args)
    assert message in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- the command

@pytest.fixture
def score_files(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "in.npy", 10 + rng.random(200))
    np.save(tmp_path / "out.npy", rng.random(200))
    return tmp_path / "in.npy", tmp_path / "out.npy"


def _cmd(members, nonmembers, *extra):
    return ["empirical-epsilon", "--member-scores", str(members), "--nonmember-scores", str(nonmembers),
            "--delta", "1e-5", *extra]


def test_cli_json(score_files, capsys):
    assert main(_cmd(*score_files, "--json", "--selection", "bonferroni", "--seed", "3")) == 0
    res = json.loads(capsys.readouterr().out)
    direct = clopper_pearson_epsilon(load_scores(score_files[0]), load_scores(score_files[1]), 1e-5,
                                     selection="bonferroni", seed=3)
    assert res == direct
    assert res["epsilon_lb"] > 0 and res["selection"] == "bonferroni"
    assert (res["n_members_eval"], res["n_nonmembers_eval"]) == (100, 100)


def test_cli_human(score_files, capsys):
    assert main(_cmd(*score_files)) == 0
    out = capsys.readouterr().out
    res = clopper_pearson_epsilon(np.load(score_files[0]), np.load(score_files[1]), 1e-5)
    lines = out.strip().splitlines()
    assert len(lines) == 2
    assert f"empirical epsilon >= {res['epsilon_lb']:.4f}" in lines[0] and "95% confidence" in lines[0]
    assert f"the most these counts could have shown: {res['epsilon_ceiling']:.4f}" in lines[0]
    assert f"upper {res['fpr_ub']:.4f}" in lines[1] and "100 members, 100 non-members" in lines[1]


def _bad_files(tmp_path):
    np.save(tmp_path / "pickled.npy", np.array([1.0, {"x": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "matrix.npy", np.zeros((4, 2)))
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    (tmp_path / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    return {"missing": (tmp_path / "missing.npy", "No such file"),
            "pickled": (tmp_path / "pickled.npy", "never loaded"),
            "matrix": (tmp_path / "matrix.npy", "1-D"),
            "text": (tmp_path / "text.npy", "real numbers"),
            "corrupt": (tmp_path / "corrupt.npy", "cannot read member scores")}


@pytest.mark.parametrize("case", ["missing", "pickled", "matrix", "text", "corrupt"])
def test_cli_bad_files_exit_2_with_one_line(case, score_files, tmp_path, capsys):
    path, message = _bad_files(tmp_path)[case]
    assert main(_cmd(path, score_files[1])) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.startswith("alignfl-audit: error: ") and "\n" not in err
    assert message in err and str(path) in err


def test_cli_bad_delta_exit_2(score_files, capsys):
    assert main(["empirical-epsilon", "--member-scores", str(score_files[0]),
                 "--nonmember-scores", str(score_files[1]), "--delta", "1.5"]) == 2
    assert "delta must be in [0, 1)" in capsys.readouterr().err


# --------------------------------------------------------------------------- canary-bound

@pytest.mark.parametrize("noise, delta, alpha", [(0.01, 1e-5, 0.05), (0.6, 1e-5, 0.05), (1.0, 0.0, 0.1)])
def test_canary_bound_gives_the_audits_bound_for_the_same_counts(noise, delta, alpha, capsys):
    """What the audit reports for a run's canaries (one_run_epsilon on scores and coin flips) is what
    canary-bound prints from the counts alone: all guesses right, some right, and a noisier attack."""
    scores, included = _canaries(200, 7, noise)
    audit = one_run_epsilon(scores, included, 40, 40, delta, beta=alpha)
    args = ["canary-bound", "--canaries", "200", "--guesses", str(audit["r"]), "--correct", str(audit["v"]),
            "--delta", str(delta), "--alpha", str(alpha)]
    assert main([*args, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res == {k: audit[k] for k in ("epsilon_lb", "epsilon_ceiling", "m", "r", "v", "beta", "delta")}
    assert main(args) == 0
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and f"epsilon >= {audit['epsilon_lb']:.4f}" in out
    assert f"{audit['v']} of {audit['r']} guesses right on 200 canaries" in out
    assert f"could have shown (all {audit['r']} right): {audit['epsilon_ceiling']:.4f}" in out
    if noise == 0.01:
        assert audit["v"] == 80 and res["epsilon_lb"] == res["epsilon_ceiling"] > 3
    if noise == 0.6:
        assert 40 < audit["v"] < 80 and 0 < res["epsilon_lb"] < res["epsilon_ceiling"]


@pytest.mark.parametrize("args, message", [
    (["--canaries", "1", "--guesses", "1", "--correct", "1"], "canaries (m) must be an integer >= 2, got 1"),
    (["--canaries", "10", "--guesses", "11", "--correct", "1"], "guesses (r = 11) cannot exceed the canaries (m = 10)"),
    (["--canaries", "10", "--guesses", "4", "--correct", "5"],
     "correct guesses (v = 5) cannot exceed the guesses (r = 4)"),
    (["--canaries", "10", "--guesses", "4", "--correct", "-1"], "correct guesses (v) must be an integer >= 0"),
    (["--canaries", "10", "--guesses", "0", "--correct", "0"], "guesses (r) must be an integer >= 1"),
    (["--canaries", "10", "--guesses", "4", "--correct", "3", "--alpha", "0"], "--alpha must be in (0, 1), got 0"),
    (["--canaries", "10", "--guesses", "4", "--correct", "3", "--alpha", "1"], "--alpha must be in (0, 1), got 1"),
    (["--canaries", "10", "--guesses", "4", "--correct", "3", "--alpha", "-0.5"], "--alpha must be in (0, 1)"),
    (["--canaries", "10", "--guesses", "4", "--correct", "3", "--delta", "1.5"], "delta must be in [0, 1)"),
])
def test_canary_bound_bad_input_is_one_line_and_exit_2(args, message, capsys):
    if "--delta" not in args:
        args = [*args, "--delta", "1e-5"]
    assert main(["canary-bound", *args, "--json"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and err.startswith("alignfl-audit: error: ") and "\n" not in err
    assert message in err
