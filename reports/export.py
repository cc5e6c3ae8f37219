"""Tidy exports of every number a report shows: one row per (run, section, metric, client)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from alignfl_audit.rundir import atomic_write
from reports.evidence import RunEvidence
from reports.summary import audit_summary

_SKIP = {"roc", "distances", "normalized_distances", "settings", "layer_norms", "figures"}


def _walk(prefix: tuple, obj, out: list) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in _SKIP:
                _walk(prefix + (str(k),), v, out)
    elif isinstance(obj, bool) or obj is None:
        out.append((prefix, obj))
    elif isinstance(obj, (int, float)):
        out.append((prefix, float(obj)))
    elif isinstance(obj, list) and len(obj) == 2 and all(isinstance(x, (int, float)) for x in obj) \
            and prefix and prefix[-1].endswith("_ci"):
        out.append((prefix[:-1] + (prefix[-1] + "_low",), float(obj[0])))
        out.append((prefix[:-1] + (prefix[-1] + "_high",), float(obj[1])))


def tidy(runs: list[RunEvidence]) -> pd.DataFrame:
    rows = []
    for run in runs:
        sources = {"utility": run.metrics.get("utility", {}), "privacy": run.metrics.get("privacy", {}),
                   "timing": run.metrics.get("timing_seconds", {})}
        if run.audit:
            for key in ("mia", "outliers", "lipschitz", "canaries", "accountant", "empirical_epsilon_detail",
                        "sensitivity"):
                sources[key] = run.audit.get(key)
            sources["summary"] = audit_summary(run)
            sources["audit"] = {k: run.audit.get(k) for k in ("empirical_epsilon", "empirical_epsilon_ceiling",
                                                               "empirical_epsilon_proven",
                                                               "empirical_epsilon_proven_ceiling")}
        for section, obj in sources.items():
            found: list = []
            _walk((), obj, found)
            for path, value in found:
                client = path[0] if section == "lipschitz" else next(
                    (path[i + 1] for i, p in enumerate(path[:-1]) if p == "clients"), None)
                rows.append({"run": run.label, "run_dir": str(run.path), "section": section,
                             "metric": ".".join(path), "client": client, "value": value})
    return pd.DataFrame(rows, columns=["run", "run_dir", "section", "metric", "client", "value"])


def write_exports(runs: list[RunEvidence], html_path: Path) -> tuple[Path, Path]:
    df = tidy(runs)
    csv_path, json_path = html_path.with_suffix(".metrics.csv"), html_path.with_suffix(".metrics.json")
    atomic_write(csv_path, df.to_csv(index=False))
    atomic_write(json_path, df.to_json(orient="records", indent=1))
    return csv_path, json_path
