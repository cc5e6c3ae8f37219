"""Membership-inference metrics from raw scores (higher = member): ROC AUC, TPR at fixed FPR,
attacker advantage, each with a stratified bootstrap 95% CI. FPR is counted over non-members only,
TPR (and FNR) over members only.

Every resample of the bootstrap is a multiset of the original scores, so all of them are evaluated at
once from counts per distinct score value: the ROC points of a resample are the cumulative member and
non-member counts from the highest value down (the points of ``sklearn.metrics.roc_curve`` with
``drop_intermediate=False``, plus repeats where a value was not drawn, which change no maximum), and its
AUC is the Mann-Whitney statistic with ties counted one half, in integers (what
``sklearn.metrics.roc_auc_score``'s trapezoids add up to, without their rounding)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve

FPR_LEVELS = (0.001, 0.01, 0.1)


def _key(level: float) -> str:
    return f"tpr_at_{level * 100:g}pct_fpr".replace(".", "_")


def _check(scores: np.ndarray, labels: np.ndarray) -> None:
    if not bool(np.isfinite(scores).all()):
        raise ValueError("membership scores contain NaN or infinity")
    if labels.all() or not labels.any():
        raise ValueError("membership metrics need both members and non-members")


def _metrics(ranks: np.ndarray, values: int, members: np.ndarray, nonmembers: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics of each row of ``members`` (D x n1) and ``nonmembers`` (D x n0), index arrays into
    ``ranks`` (the rank of each score among the ``values`` distinct scores); one value per row."""
    draws = len(members)

    def counts(idx: np.ndarray) -> np.ndarray:  # (D, values), the highest score first
        flat = (np.arange(draws)[:, None] * values + (values - 1 - ranks[idx])).ravel()
        return np.bincount(flat, minlength=draws * values).reshape(draws, values)

    pos, neg = counts(members), counts(nonmembers)
    n_pos, n_neg = members.shape[1], nonmembers.shape[1]
    cum_pos, cum_neg = pos.cumsum(1), neg.cumsum(1)
    above = cum_pos - pos  # members strictly above each value
    twice_u = (neg * (2 * above + pos)).sum(1)  # 2 x (pairs ranked right + half the ties)
    tpr = np.c_[np.zeros(draws), cum_pos / n_pos]
    fpr = np.c_[np.zeros(draws), cum_neg / n_neg]
    out = {"auc": twice_u / (2 * n_pos * n_neg), "advantage": (tpr - fpr).max(1)}
    for level in FPR_LEVELS:
        out[_key(level)] = np.where(fpr <= level + 1e-12, tpr, -np.inf).max(1)
    return out


def _ranks(scores: np.ndarray) -> tuple[np.ndarray, int]:
    values, ranks = np.unique(scores, return_inverse=True)
    return ranks.ravel(), len(values)


def point_metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    _check(scores, labels)
    ranks, values = _ranks(scores)
    m = _metrics(ranks, values, np.flatnonzero(labels)[None], np.flatnonzero(~labels)[None])
    return {k: float(v[0]) for k, v in m.items()}


def membership_metrics(scores: np.ndarray, labels: np.ndarray, bootstrap: int, seed: int) -> dict:
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    point = point_metrics(scores, labels)
    rng = np.random.default_rng([seed, 0xB007])
    members, nonmembers = np.flatnonzero(labels), np.flatnonzero(~labels)
    # the same draws, in the same order, as one resample at a time would take
    drawn = [(rng.choice(members, len(members)), rng.choice(nonmembers, len(nonmembers))) for _ in range(bootstrap)]
    out = dict(point)
    if drawn:
        ranks, values = _ranks(scores)
        draws = _metrics(ranks, values, np.stack([m for m, _ in drawn]), np.stack([n for _, n in drawn]))
        for k, v in draws.items():
            out[f"{k}_ci"] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
    out.update(n_members=int(len(members)), n_nonmembers=int(len(nonmembers)),
               fpr_resolution=1.0 / len(nonmembers), bootstrap=bootstrap)
    return out


def roc_arrays(scores: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    fpr, tpr, thresholds = roc_curve(np.asarray(labels, bool), np.asarray(scores, np.float64))
    return {"fpr": fpr, "tpr": tpr, "thresholds": thresholds}
