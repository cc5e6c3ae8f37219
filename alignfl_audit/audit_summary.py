"""audit.json's ``summary``: the few numbers a run is judged by, picked once by the audit.

The report's summary row and frontier, the audit command's line and the benchmark tables read this block
and pick nothing themselves. :func:`audit_summary` builds it from the rest of an audit (the audit writes
it); :func:`read_summary` returns the recorded block, or, for an audit written before it existed
(alignfl-audit/1 to /3), the same function's result on what that audit recorded. A number such an audit
did not record stays None here.

The picks: the best membership attack (highest pooled AUC, ``attacks.selection``), the membership-game
estimate as the audit headlines it (the largest over attacks) with its ceiling, the canary bound and
whether it sits at its ceiling, the accountant's epsilon (the largest over clients,
``alignfl_audit.accounting.run_epsilon``, under the headline relation and under add/remove) and whether the
canary bound exceeds it, and the outlier verdicts.
"""
from __future__ import annotations

from alignfl_audit.accounting import LEGACY_RELATION
from attacks.selection import best_attack


def audit_summary(audit: dict) -> dict:
    name = best_attack(audit["mia"])
    m = audit["mia"][name]
    sensitivity = audit.get("sensitivity")
    detail = audit.get("empirical_epsilon_detail") or {}
    accountant = _accountant(audit.get("accountant") or {})
    canary = _canary(audit.get("canaries") or {})
    outliers = audit.get("outliers") or None
    return {
        "best_attack": {"name": name, **{k: m[k] for k in ("auc", "auc_ci", "tpr_at_1pct_fpr",
                                                           "tpr_at_1pct_fpr_ci")}},
        "chance_band": {k: sensitivity["membership_game"][k] for k in ("auc_half_width", "n_members", "n_nonmembers")}
        if sensitivity else None,
        "estimate": {"epsilon": audit["empirical_epsilon"], "attack": detail.get("attack"),
                     "ceiling": audit.get("empirical_epsilon_ceiling")},
        "canary": canary,
        "canary_note": None if canary else _canary_note(audit.get("canaries") or {}),
        "accountant": accountant,
        # canaries are inserted or left out: the add/remove epsilon is the formal one to hold the bound against
        "canary_above_accountant": (canary["epsilon_lb"] > accountant["epsilon_add_remove"]
                                    if canary and accountant["epsilon_add_remove"] is not None else None),
        "outliers": {"memorisation": outliers["memorisation"]["verdict"],
                     "typical_mapping": outliers["typical_mapping"]["verdict"],
                     "reconstruction_rate": outliers["reconstruction_rate"],
                     "control_rate": outliers.get("control_rate")}
        if outliers and "memorisation" in outliers else None,
    }


def read_summary(audit: dict) -> dict:
    """The summary an audit recorded, or the one :func:`audit_summary` gives for an audit written before."""
    return audit.get("summary") or audit_summary(audit)


def _accountant(acc: dict) -> dict:
    if not acc.get("formal_guarantee"):
        return {"formal_guarantee": False, "relation": None, "epsilon": None, "epsilon_add_remove": None,
                "delta": None}
    if "relation" not in acc:  # recorded before both relations were reported: add/remove only
        return {"formal_guarantee": True, "relation": LEGACY_RELATION, "epsilon": acc.get("epsilon"),
                "epsilon_add_remove": acc.get("epsilon"), "delta": acc.get("delta")}
    return {"formal_guarantee": True, "relation": acc["relation"], "epsilon": acc["epsilon"],
            "epsilon_add_remove": acc["epsilon_add_remove"], "delta": acc["delta"]}


def _canary_note(c: dict) -> str:
    return f"canaries: {c['note']}" if c.get("note") else "no canaries: no proven bound"


def _canary(c: dict) -> dict | None:
    if c.get("epsilon_lb") is None:
        return None
    ceiling = c.get("epsilon_ceiling")
    return {"epsilon_lb": c["epsilon_lb"], "epsilon_ceiling": ceiling,
            "at_ceiling": None if ceiling is None else c["epsilon_lb"] >= ceiling,
            **{k: c.get(k) for k in ("m", "r", "v", "delta", "beta")}}
