"""The audit's picks across attacks, each made here only: the best membership attack (by AUC) and the
largest ceiling of the per-attack Clopper-Pearson estimates (the most the estimate could have shown)."""
from __future__ import annotations

from attacks.empirical_epsilon import clopper_pearson_ceiling


def best_attack(mia: dict) -> str | None:
    """The attack with the highest pooled AUC (the first of equals, in the audit's order); None without
    any attack."""
    return max(mia, key=lambda name: mia[name]["auc"]) if mia else None


def largest_ceiling(per_attack: dict) -> float:
    """The largest per-attack ceiling: each as recorded, or, for an audit written before ceilings were
    recorded, from the recorded counts of its evaluation half."""
    return max(d["epsilon_ceiling"] if "epsilon_ceiling" in d else clopper_pearson_ceiling(
        d["n_members_eval"], d["n_nonmembers_eval"], d["delta"], d["alpha"], d["n_candidates"])
        for d in per_attack.values())
