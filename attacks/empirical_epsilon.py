"""Empirical lower bounds on epsilon: what a membership attack *proves* about a mechanism.

An upper bound on epsilon comes from the accountants (``alignfl_audit.accounting``); this module
turns the output of an attack into a statistical lower bound, valid with probability at least
1 - alpha (or 1 - beta) over the randomness of the experiment. Two procedures:

* :func:`clopper_pearson_epsilon` (Jagielski, Ullman, Oprea 2020, "Auditing differentially private
  machine learning"): a threshold attack on member and non-member scores, one-sided Clopper-Pearson
  upper bounds on its false positive and false negative rates, and the (epsilon, delta)-DP
  hypothesis-testing inequality. It assumes every score is an independent trial of the mechanism
  on a pair of neighbouring inputs (e.g. one trained model per score). Scores of many records of
  ONE training run are not independent trials, and the bound computed from them is a heuristic.
* :func:`one_run_epsilon` (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training
  Run", arXiv 2305.08846): m canaries, each included independently with probability 1/2 in a single
  run; the auditor guesses in/out for the canaries it is most sure about; the number of correct
  guesses is compared with what an (epsilon, delta)-DP mechanism allows. Valid for one run, under
  that randomized inclusion.

Each bound also reports its ``epsilon_ceiling``: the most it could show with the same counts if the
attack made no mistake (:func:`clopper_pearson_ceiling`, :func:`one_run_ceiling`). A bound at its
ceiling says the audit's size, not the mechanism, stopped it.

Scores follow one convention throughout: higher score = more likely a member.
"""
from __future__ import annotations

import numpy as np
from scipy import special, stats

from federation.errors import ConfigError

SELECTIONS = ("split", "bonferroni")
_BISECTION_STEPS = 60


# --------------------------------------------------------------------------- validation

def _scores(values, name: str, min_size: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind not in "biuf":
        raise ConfigError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ConfigError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if arr.size < min_size:
        raise ConfigError(f"{name} needs at least {min_size} score(s), got {arr.size}")
    arr = arr.astype(float)
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        raise ConfigError(f"{name} holds {bad} non-finite score(s) (NaN or inf)")
    return arr


def _probability(value, name: str, low_open: bool) -> float:
    """A real number in (0, 1) (``low_open``) or [0, 1)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    ok = (0.0 < x < 1.0) if low_open else (0.0 <= x < 1.0)
    if isinstance(value, bool) or not ok:
        raise ConfigError(f"{name} must be in {'(0, 1)' if low_open else '[0, 1)'}, got {value!r}")
    return x


def _count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def load_scores(path, name: str = "scores") -> np.ndarray:
    """Read a 1-D array of finite real scores from a ``.npy`` file, never unpickling anything.

    Every failure (missing, unreadable or corrupt file, a pickled object array, an ``.npz``
    archive, a non-1-D or non-numeric array, non-finite values) raises a one-line ConfigError.
    """
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        if "pickle" in reason.lower():  # numpy's text suggests loading unsafely; we never will
            reason = "not a plain .npy array of numbers (pickled data and object arrays are never loaded)"
        raise ConfigError(f"cannot read {name} from {path}: {reason}") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive gives an NpzFile
        if hasattr(arr, "close"):
            arr.close()
        raise ConfigError(f"cannot read {name} from {path}: not a single .npy array")
    return _scores(arr, f"{name} ({path})", min_size=1)


# --------------------------------------------------------------------------- Clopper-Pearson

def clopper_pearson_upper(successes, trials, alpha: float):
    """One-sided Clopper-Pearson upper confidence bound on a binomial rate.

    With probability at least ``1 - alpha`` the true rate p satisfies p <= bound, where the bound
    is the ``1 - alpha`` quantile of Beta(successes + 1, trials - successes) (and 1 when every
    trial succeeded). Works elementwise on arrays; returns a float for scalar input.
    """
    k = np.asarray(successes, dtype=float)
    n = np.asarray(trials, dtype=float)
    full = k >= n
    with np.errstate(invalid="ignore"):
        ub = stats.beta.ppf(1.0 - alpha, k + 1.0, np.where(full, 1.0, n - k))
    ub = np.where(full, 1.0, ub)
    return float(ub) if ub.ndim == 0 else ub


def _log_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """log(num / den) where num > 0, else 0 (a non-positive numerator proves nothing)."""
    out = np.zeros(np.broadcast(num, den).shape)
    num, den = np.broadcast_arrays(num, den)
    ok = num > 0
    out[ok] = np.log(num[ok] / den[ok])
    return out


def _epsilon_from_rates(fpr, fnr, delta: float) -> np.ndarray:
    """max(log((1-delta-FNR)/FPR), log((1-delta-FPR)/FNR), 0), elementwise; rates must be > 0."""
    fpr, fnr = np.asarray(fpr, dtype=float), np.asarray(fnr, dtype=float)
    return np.maximum(np.maximum(_log_ratio(1.0 - delta - fnr, fpr), _log_ratio(1.0 - delta - fpr, fnr)), 0.0)


def _error_counts(members: np.ndarray, nonmembers: np.ndarray, thresholds: np.ndarray):
    """Errors of the rule 'member iff score >= t' at each t: (false positives among the
    non-members, false negatives among the members)."""
    fp = nonmembers.size - np.searchsorted(np.sort(nonmembers), thresholds, side="left")
    fn = np.searchsorted(np.sort(members), thresholds, side="left")
    return fp, fn


def _select_threshold(members: np.ndarray, nonmembers: np.ndarray, delta: float, alpha: float) -> float:
    """The threshold a selection half points to: the one with the largest Clopper-Pearson epsilon
    on these scores themselves.

    This is the point-estimate formula with each rate replaced by its upper bound, which guards
    zero rates and, unlike raw rates with a floor, does not chase thresholds in the tails where a
    handful of counts gives a large but noisy ratio (on Gaussian scores 1 sd apart it gives a
    markedly higher final bound). Candidates are the midpoints between consecutive distinct
    pooled scores, i.e. every distinct rule 'score >= t' that splits the pool; among equally good
    candidates the middle one is taken, which centres the threshold in a separating gap.
    """
    pooled = np.unique(np.concatenate([members, nonmembers]))
    if pooled.size == 1:
        return float(pooled[0])
    cands = pooled[:-1] / 2.0 + pooled[1:] / 2.0
    fp, fn = _error_counts(members, nonmembers, cands)
    eps = _epsilon_from_rates(clopper_pearson_upper(fp, nonmembers.size, alpha / 2),
                              clopper_pearson_upper(fn, members.size, alpha / 2), delta)
    best = np.flatnonzero(eps == eps.max())
    return float(cands[best[best.size // 2]])


def clopper_pearson_epsilon(member_scores, nonmember_scores, delta: float, alpha: float = 0.05,
                            selection: str = "split", seed: int = 0, n_thresholds: int = 20,
                            threshold: float | None = None) -> dict:
    """A (1 - alpha)-confidence lower bound on epsilon from a threshold membership attack.

    The rule 'member iff score >= t' has FPR = fraction of NON-members predicted member and
    FNR = fraction of MEMBERS predicted non-member. Any (epsilon, delta)-DP mechanism forces
    FPR + e^epsilon FNR >= 1 - delta and FNR + e^epsilon FPR >= 1 - delta, so with one-sided
    Clopper-Pearson upper bounds FPR_ub, FNR_ub (each at level alpha/2, jointly valid with
    probability >= 1 - alpha by the union bound)

        epsilon_lb = max(log((1-delta-FNR_ub)/FPR_ub), log((1-delta-FPR_ub)/FNR_ub), 0).

    The threshold must not be chosen on the data the bound is computed from. Members and
    non-members are each shuffled (a permutation drawn from ``seed`` that depends only on the
    number of scores) and halved: the first half selects, the second half evaluates.

    * ``selection="split"``: the threshold maximizing the epsilon formula on the selection half
      (with Clopper-Pearson rates, see :func:`_select_threshold`); the bound on the evaluation
      half. Valid because the threshold is a function of the selection half only, hence
      independent of the evaluation trials, so the evaluation error counts are
      Binomial(n_eval, true rate at that threshold).
    * ``selection="bonferroni"``: k candidates fixed by the selection half alone (the split pick
      plus ``n_thresholds - 1`` evenly spaced quantiles of its pooled scores; duplicates dropped);
      each is bounded on the evaluation half at level alpha/k (alpha/(2k) per rate) and the
      largest epsilon is reported. Valid because the candidate set is independent of the
      evaluation half and, by the union bound, all k joint bounds hold at once with probability
      >= 1 - alpha, so the maximum is covered too.
    * ``threshold=t`` (``selection`` is then reported as ``"fixed"``): a threshold fixed before
      these scores were seen (e.g. chosen on an earlier, independent experiment); no split, every
      score evaluates. Valid only if t truly does not depend on these scores.

    When both sides have the same size they get the same permutation, so identical score arrays
    give FPR = 1 - FNR at every threshold and a bound of exactly 0.

    Validity assumes each score is an independent trial (e.g. one model trained per score), as in
    Jagielski et al.; see the module docstring.
    """
    min_size = 1 if threshold is not None else 2  # a split needs a score on each side of it
    members = _scores(member_scores, "member_scores", min_size=min_size)
    nonmembers = _scores(nonmember_scores, "nonmember_scores", min_size=min_size)
    delta = _probability(delta, "delta", low_open=False)
    alpha = _probability(alpha, "alpha", low_open=True)
    if selection not in SELECTIONS:
        raise ConfigError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    seed = _count(seed, "seed", 0)
    n_thresholds = _count(n_thresholds, "n_thresholds", 1)
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)) \
                or not np.isfinite(threshold):
            raise ConfigError(f"threshold must be a finite number, got {threshold!r}")
        return _bound(members, nonmembers, np.array([float(threshold)]), delta, alpha, "fixed")

    def halves(x: np.ndarray):
        shuffled = x[np.random.default_rng(seed).permutation(x.size)]
        cut = x.size // 2
        return shuffled[:cut], shuffled[cut:]

    sel_m, eval_m = halves(members)
    sel_n, eval_n = halves(nonmembers)

    pick = _select_threshold(sel_m, sel_n, delta, alpha)
    if selection == "split":
        cands = np.array([pick])
    else:
        pooled = np.concatenate([sel_m, sel_n])
        grid = np.quantile(pooled, np.arange(1, n_thresholds) / n_thresholds)
        cands = np.concatenate([[pick], np.setdiff1d(np.unique(grid), [pick])])
    return _bound(eval_m, eval_n, cands, delta, alpha, selection)


def _bound(eval_m: np.ndarray, eval_n: np.ndarray, cands: np.ndarray, delta: float, alpha: float,
           selection: str) -> dict:
    """The Clopper-Pearson bound at each candidate threshold (Bonferroni over them), and the best."""
    k = cands.size
    fp, fn = _error_counts(eval_m, eval_n, cands)
    fpr_ub = clopper_pearson_upper(fp, eval_n.size, alpha / (2 * k))
    fnr_ub = clopper_pearson_upper(fn, eval_m.size, alpha / (2 * k))
    eps = _epsilon_from_rates(fpr_ub, fnr_ub, delta)
    i = int(np.argmax(eps))  # the first maximum: the split pick (first candidate) wins ties
    return {
        "epsilon_lb": float(eps[i]),
        "epsilon_ceiling": clopper_pearson_ceiling(eval_m.size, eval_n.size, delta, alpha, k),
        "threshold": float(cands[i]),
        "fpr": float(fp[i] / eval_n.size),
        "fnr": float(fn[i] / eval_m.size),
        "fpr_ub": float(np.asarray(fpr_ub)[i]),
        "fnr_ub": float(np.asarray(fnr_ub)[i]),
        "n_members_eval": int(eval_m.size),
        "n_nonmembers_eval": int(eval_n.size),
        "n_candidates": int(k),
        "alpha": alpha,
        "delta": delta,
        "selection": selection,
    }


def clopper_pearson_ceiling(n_members: int, n_nonmembers: int, delta: float, alpha: float,
                            n_candidates: int = 1) -> float:
    """The most :func:`clopper_pearson_epsilon` can report on an evaluation half of this size: the bound
    when the threshold makes no error at all (FP = FN = 0), where both Clopper-Pearson upper bounds are
    smallest. No attack, however strong, can prove more with these counts."""
    n_members = _count(n_members, "n_members", 1)
    n_nonmembers = _count(n_nonmembers, "n_nonmembers", 1)
    delta = _probability(delta, "delta", low_open=False)
    alpha = _probability(alpha, "alpha", low_open=True)
    level = alpha / (2 * _count(n_candidates, "n_candidates", 1))
    return float(_epsilon_from_rates(clopper_pearson_upper(0, n_nonmembers, level),
                                     clopper_pearson_upper(0, n_members, level), delta))


# --------------------------------------------------------------------------- one run

def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] allowed by an (epsilon, delta)-DP mechanism.

    Steinke, Nasr, Jagielski 2023: with W ~ Binomial(r, e^eps / (1 + e^eps)),

        p = P[W >= v] + 2 m delta * max_{1 <= i <= v} P[v - i <= W < v] / i,

    capped at 1; for delta = 0 it is the binomial tail alone.
    """
    q = float(special.expit(epsilon))
    p = float(stats.binom.sf(v - 1, r, q))
    if delta > 0 and v > 0:
        below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[W = v - i], i = 1..v
        p += 2.0 * m * delta * float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(p, 1.0)


def one_run_epsilon(canary_scores, included, k_pos: int, k_neg: int, delta: float, beta: float = 0.05,
                    seed: int = 0) -> dict:
    """A (1 - beta)-confidence lower bound on epsilon from one run with m random canaries.

    Each of the m canaries was included in training independently with probability 1/2
    (``included``). The auditor guesses "in" for the ``k_pos`` highest scores and "out" for the
    ``k_neg`` lowest, abstaining on the rest; r = k_pos + k_neg guesses, v of them correct.
    epsilon_lb is the largest epsilon (found by bisection) whose p-value
    :func:`one_run_p_value` is <= beta. The returned value itself always satisfies
    p(epsilon_lb) <= beta, which is all validity needs: a mechanism that is (epsilon', delta)-DP
    for some epsilon' < epsilon_lb is also (epsilon_lb, delta)-DP, so it is rejected too.

    Validity requires the guesses to be independent of ``included`` given the scores: k_pos and
    k_neg are fixed before looking at the outcome (trying several and keeping the best needs a
    correction), and tied scores at a cut-off are ordered by a permutation drawn from ``seed``,
    not by the array order (which a caller might have sorted by inclusion).
    """
    scores = _scores(canary_scores, "canary_scores", min_size=1)
    inc = np.asarray(included)
    if inc.ndim != 1 or inc.size != scores.size:
        raise ConfigError(f"included must be a 1-D array as long as canary_scores ({scores.size}), "
                          f"got shape {inc.shape}")
    if inc.dtype != bool:
        if inc.dtype.kind not in "iu" or not np.isin(inc, (0, 1)).all():
            raise ConfigError(f"included must be booleans (or 0/1), got dtype {inc.dtype}")
        inc = inc.astype(bool)
    m = scores.size
    k_pos = _count(k_pos, "k_pos", 0)
    k_neg = _count(k_neg, "k_neg", 0)
    if k_pos + k_neg > m:
        raise ConfigError(f"k_pos + k_neg = {k_pos + k_neg} exceeds the number of canaries m = {m}")
    delta = _probability(delta, "delta", low_open=False)
    beta = _probability(beta, "beta", low_open=True)
    seed = _count(seed, "seed", 0)

    perm = np.random.default_rng(seed).permutation(m)
    order = perm[np.argsort(-scores[perm], kind="stable")]  # descending, ties in random order
    v = int(np.count_nonzero(inc[order[:k_pos]]) + np.count_nonzero(~inc[order[m - k_neg:]]))
    r = k_pos + k_neg
    return {"epsilon_lb": _largest_rejected(m, r, v, delta, beta),
            "epsilon_ceiling": _largest_rejected(m, r, r, delta, beta),  # the most these m, r can prove
            "m": int(m), "r": int(r), "v": v, "k_pos": k_pos, "k_neg": k_neg, "beta": beta, "delta": delta}


def one_run_ceiling(m: int, r: int, delta: float, beta: float = 0.05) -> float:
    """The most :func:`one_run_epsilon` can prove with m canaries and r guesses: its bound when all r
    guesses are right (v = r). For delta = 0 this is max(0, logit(beta ** (1 / r))); a positive delta lowers it
    slightly through the 2 m delta term. No attack, however strong, can prove more with these counts."""
    m, r, delta, beta = _one_run_counts(m, r, delta, beta)
    return _largest_rejected(m, r, r, delta, beta)


def one_run_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05) -> dict:
    """:func:`one_run_epsilon`'s bound and ceiling from its counts alone: m canaries, r guesses, v of them
    right. The same numbers the audit reports for these counts, so a reported bound can be checked by hand."""
    m, r, delta, beta = _one_run_counts(m, r, delta, beta)
    v = _count(v, "correct guesses (v)", 0)
    if v > r:
        raise ConfigError(f"correct guesses (v = {v}) cannot exceed the guesses (r = {r})")
    return {"epsilon_lb": _largest_rejected(m, r, v, delta, beta),
            "epsilon_ceiling": _largest_rejected(m, r, r, delta, beta),
            "m": m, "r": r, "v": v, "beta": beta, "delta": delta}


def _one_run_counts(m, r, delta, beta) -> tuple[int, int, float, float]:
    m = _count(m, "canaries (m)", 2)
    r = _count(r, "guesses (r)", 1)
    if r > m:
        raise ConfigError(f"guesses (r = {r}) cannot exceed the canaries (m = {m})")
    return m, r, _probability(delta, "delta", low_open=False), _probability(beta, "beta", low_open=True)


def _largest_rejected(m: int, r: int, v: int, delta: float, beta: float) -> float:
    """The largest epsilon whose p-value (:func:`one_run_p_value`) is <= beta, by bisection; 0 if none."""
    def rejected(eps: float) -> bool:
        return one_run_p_value(m, r, v, eps, delta) <= beta

    lo = 0.0
    if r > 0 and rejected(0.0):
        hi = 1.0
        while rejected(hi) and hi < 1024.0:  # p -> 1 as eps grows whenever v <= r, so this stops
            lo, hi = hi, 2.0 * hi
        for _ in range(_BISECTION_STEPS):
            mid = (lo + hi) / 2.0
            if rejected(mid):
                lo = mid
            else:
                hi = mid
    return float(lo)
