"""Membership-inference metrics from raw scores (higher = member): ROC AUC, TPR at fixed FPR,
attacker advantage, each with a stratified bootstrap 95% CI. FPR is counted over non-members only,
TPR (and FNR) over members only."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

FPR_LEVELS = (0.001, 0.01, 0.1)


def _key(level: float) -> str:
    return f"tpr_at_{level * 100:g}pct_fpr".replace(".", "_")


def point_metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    out = {"auc": float(roc_auc_score(labels, scores)), "advantage": float(np.max(tpr - fpr))}
    for level in FPR_LEVELS:
        out[_key(level)] = float(tpr[fpr <= level + 1e-12].max())
    return out


def membership_metrics(scores: np.ndarray, labels: np.ndarray, bootstrap: int, seed: int) -> dict:
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    point = point_metrics(scores, labels)
    rng = np.random.default_rng([seed, 0xB007])
    members, nonmembers = np.flatnonzero(labels), np.flatnonzero(~labels)
    draws = {k: [] for k in point}
    for _ in range(bootstrap):
        idx = np.r_[rng.choice(members, len(members)), rng.choice(nonmembers, len(nonmembers))]
        for k, v in point_metrics(scores[idx], labels[idx]).items():
            draws[k].append(v)
    out = dict(point)
    for k, values in draws.items():
        out[f"{k}_ci"] = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
    out.update(n_members=int(len(members)), n_nonmembers=int(len(nonmembers)),
               fpr_resolution=1.0 / len(nonmembers), bootstrap=bootstrap)
    return out


def roc_arrays(scores: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    fpr, tpr, thresholds = roc_curve(np.asarray(labels, bool), np.asarray(scores, np.float64))
    return {"fpr": fpr, "tpr": tpr, "thresholds": thresholds}
