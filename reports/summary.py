"""Pick the numbers a report shows from the JSON files beside it (no metric is computed here)."""
from __future__ import annotations

from reports.evidence import RunEvidence


def run_privacy(privacy: dict) -> dict | None:
    """The run's accountant epsilon as metrics.json records it (privacy.headline), or, for a run written
    before it was recorded, as the audit's accounting picks it (the same function)."""
    if "headline" in privacy:
        return privacy["headline"]
    from alignfl_audit.accounting import run_epsilon

    return run_epsilon(privacy)


def headline_epsilon(privacy: dict) -> float | None:
    """The largest per-client accountant epsilon under the headline relation, only for a formal guarantee."""
    top = run_privacy(privacy)
    return top["epsilon"] if top else None


def _client_epsilons(clients: dict) -> list[tuple[str, float, float | None]]:
    """(client, headline epsilon, add/remove epsilon or None where only one relation was recorded), the
    largest headline first."""
    rows = [(cid, c["headline"]["epsilon"],
             c["relations"]["add-remove"]["headline"]["epsilon"] if "relations" in c else None)
            for cid, c in clients.items()]
    return sorted(rows, key=lambda row: -row[1])


def audit_summary(run: RunEvidence) -> dict | None:
    """The audit's summary block (alignfl_audit.audit_summary: recorded, or for an older audit computed by the
    same function); None for a run without an audit."""
    from alignfl_audit.audit_summary import read_summary

    return read_summary(run.audit) if run.audit else None


def shares_decoders(run: RunEvidence) -> bool:
    """Whether the run's strategy shared anything (a strategy without federation shares nothing)."""
    return bool(run.metrics.get("shared_artifacts"))


def verdict_row(run: RunEvidence) -> dict:
    privacy = run.metrics.get("privacy", {})
    formal = bool(privacy.get("formal_guarantee"))
    clients = privacy.get("clients", {}) if formal else {}
    audit = run.audit
    outliers = (audit or {}).get("outliers") or None
    lipschitz = (audit or {}).get("lipschitz") or {}
    return {
        "label": run.label,
        "mechanism": privacy.get("mechanism", "none"),
        "formal": formal,
        "guarantee_note": privacy.get("note") or privacy.get("epsilon_withheld") or "",
        "delta": privacy.get("delta") if formal else None,
        "epsilon_per_client": _client_epsilons(clients),  # headline (largest) first
        "epsilon_relation": (run_privacy(privacy) or {}).get("relation"),
        "extra_artifacts": privacy.get("extra_artifacts", {}),
        "audited": audit is not None,
        "shares_decoders": shares_decoders(run),
        "summary": audit_summary(run),  # the audit's picks: best attack, bounds, verdicts (None: not audited)
        "outliers": outliers,
        "lipschitz": sorted((cid, b["lower"], b["upper"]) for cid, b in lipschitz.items()),
        "utility": run.metrics.get("utility", {}),
        "notes": run.metrics.get("notes", {}),
    }
