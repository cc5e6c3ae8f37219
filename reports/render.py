"""One self-contained HTML report for one or more run directories (inline CSS, figures as data URIs,
no script, nothing fetched), with tidy CSV/JSON exports of every number beside it."""
from __future__ import annotations

import time
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined, TemplateError, select_autoescape

from alignfl_audit.rundir import atomic_write
from reports import figures
from reports.size_curves import leakage_vs_size
from reports.evidence import RunEvidence, load_run
from reports.export import write_exports
from reports.summary import verdict_row
from federation.errors import DataError


def _environment() -> Environment:
    # autoescape: every string from a config, a file name or data is escaped
    return Environment(loader=PackageLoader("reports", "templates"), autoescape=select_autoescape(["j2", "html"]),
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _run_context(run: RunEvidence, row: dict) -> dict:
    m = run.metrics
    return {"row": row, "path": str(run.path), "status": (run.status or {}).get("state", "unknown"),
            "seed": m.get("seed"), "strategy": m.get("strategy"), "audit": run.audit, "ledger": run.ledger,
            "images": run.images, "roc": figures.roc(run), "rounds_plot": figures.rounds(run),
            "config_sha256": m.get("config_sha256"), "provenance": m.get("provenance"), "data": m.get("data", {}),
            "timing": {**m.get("timing_seconds", {}),
                       **{f"audit {k}": v for k, v in ((run.audit or {}).get("timing_seconds") or {}).items()}},
            "config_text": run.config_text}


def render_report(run_dirs: list[str | Path], out: str | Path, title: str | None = None) -> Path:
    runs = [load_run(p) for p in run_dirs]
    out = Path(out)
    csv_path, json_path = out.with_suffix(".metrics.csv"), out.with_suffix(".metrics.json")
    try:
        rows = [verdict_row(r) for r in runs]
        html = _render(runs, rows, csv_path, json_path, title)
    except (TemplateError, KeyError, TypeError, AttributeError) as err:  # a file of unexpected shape: one line
        raise DataError(f"cannot render the report: a run file lacks a field the report needs ({err!r})") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    write_exports(runs, out)
    atomic_write(out, html)  # only a complete report replaces an earlier one
    return out


def _render(runs, rows, csv_path, json_path, title) -> str:
    return _environment().get_template("report.html.j2").render(
        title=title or ("Privacy-utility report: " + ", ".join(r.label for r in runs[:3])
                        + (f" and {len(runs) - 3} more" if len(runs) > 3 else "")),
        generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"), rows=rows, frontier=figures.frontier(runs),
        size_curves=leakage_vs_size(runs),
        runs=[_run_context(r, row) for r, row in zip(runs, rows)], exports=[csv_path.name, json_path.name])
