"""What an audit could have seen: the resolution of its membership game and the ceilings of its bounds.

A result of "no leakage" means little unless the audit could have seen leakage of the size in question.
This module states that from the audit's own sizes, independent of the scores it happened to get:

* the membership game's AUC half-width: the Hanley-McNeil (1982) standard error of the AUC evaluated at
  AUC = 0.5, times the two-sided normal quantile. At AUC 0.5 it is the null variance of the
  Mann-Whitney statistic, (n1 + n2 + 1) / (12 n1 n2), so an AUC inside 0.5 +- half-width is what chance
  alone gives at this sample size (at the stated confidence): the game cannot resolve a smaller effect;
* the ceiling of each epsilon bound (attacks.empirical_epsilon): the most it could report with these
  counts if the attack made no mistake.
"""
from __future__ import annotations

import math

from scipy import stats

from attacks.selection import best_attack, largest_ceiling
from federation.errors import ConfigError

METHOD = ("Hanley-McNeil (1982) standard error of the AUC at AUC = 0.5, i.e. sqrt((n1 + n2 + 1) / (12 n1 n2)), "
          "times the two-sided normal quantile: an AUC inside 0.5 +- half-width is within what chance gives "
          "at this sample size")


def auc_half_width(n_members: int, n_nonmembers: int, confidence: float = 0.95) -> float:
    """Half-width of the chance band of the AUC for n_members members and n_nonmembers non-members."""
    for name, n in (("n_members", n_members), ("n_nonmembers", n_nonmembers)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {n!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    se = math.sqrt((n_members + n_nonmembers + 1) / (12.0 * n_members * n_nonmembers))
    return float(stats.norm.ppf(0.5 + confidence / 2) * se)


def audit_sensitivity(mia: dict, empirical: dict, canaries: dict | None, alpha: float) -> dict:
    """The audit's sensitivity block, from its pooled and per-client game sizes (``mia``), the
    Clopper-Pearson detail (``empirical``) and the canary result (``canaries``, None without canaries)."""
    confidence = 1.0 - alpha
    first = next(iter(mia.values()))

    def game(m: dict) -> dict:
        n1, n0 = int(m["n_members"]), int(m["n_nonmembers"])
        h = auc_half_width(n1, n0, confidence)
        return {"n_members": n1, "n_nonmembers": n0, "auc_half_width": h, "chance_band": [0.5 - h, 0.5 + h]}

    best = best_attack(mia)
    ci = mia[best].get("auc_ci")
    membership = {**game(first), "confidence": confidence, "method": METHOD,
                  "clients": {cid: game(c) for cid, c in first.get("clients", {}).items()},
                  "best_attack": best,
                  "best_attack_bootstrap_half_width": (ci[1] - ci[0]) / 2 if ci else None}
    estimate_ceiling = largest_ceiling(empirical["per_attack"])
    canary = None
    if canaries and canaries.get("epsilon_ceiling") is not None:
        canary = {k: canaries[k] for k in ("m", "r", "delta", "beta", "epsilon_ceiling")}
    return {"membership_game": membership,
            "membership_estimate_ceiling": estimate_ceiling,
            "canaries": canary,
            "canary_note": None if canary else
            "no canaries were inserted (partition.canaries.count: 0), so no proven lower bound was possible"}
