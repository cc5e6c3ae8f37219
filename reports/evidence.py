"""Read what a run directory holds, for rendering: metrics.json, audit.json, privacy_ledger.json,
rounds.csv, the resolved config and the PNG figures. Nothing here computes a metric; absent files are
``None`` so that a report can explain a missing section instead of failing."""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from federation import run_layout as layout
from federation.errors import DataError


@dataclass
class RunEvidence:
    path: Path
    metrics: dict
    audit: dict | None
    ledger: dict | None
    rounds: pd.DataFrame | None
    config_text: str | None
    status: dict | None
    images: dict[str, str] = field(default_factory=dict)  # name -> data URI

    @property
    def label(self) -> str:
        return f"{self.metrics.get('name', self.path.name)} ({self.path.name})"


def _json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path}: {err}") from None


AUDIT_KEYS = ("mia", "empirical_epsilon", "empirical_epsilon_detail", "lipschitz", "accountant", "seed")


def _checked(value, path: Path, keys: tuple[str, ...], what: str):
    if value is None:
        return None
    if not isinstance(value, dict) or any(k not in value for k in keys):
        missing = [k for k in keys if not isinstance(value, dict) or k not in value]
        raise DataError(f"{path} is not a valid {what} (missing {', '.join(missing[:4])})")
    return value


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def load_run(path: str | Path) -> RunEvidence:
    path = Path(path)
    metrics = _json(path / layout.METRICS)
    if metrics is None:
        status = _json(path / layout.STATUS)
        state = status.get("state", "no status") if isinstance(status, dict) else "no status"
        raise DataError(f"{path} is not a finished run (no {layout.METRICS}; status: {state})")
    _checked(metrics, path / layout.METRICS, ("utility", "privacy"), "metrics file")
    if layout.run_format(metrics) not in layout.READABLE_RUN_FORMATS:
        raise DataError(f"{path} was written in run format {layout.run_format(metrics)!r}; this version reads "
                        f"{', '.join(layout.READABLE_RUN_FORMATS)} (upgrade alignfl-audit)")
    audit = _checked(_json(path / layout.AUDIT), path / layout.AUDIT, AUDIT_KEYS, "audit file")
    if audit is not None and audit.get("format") not in layout.READABLE_AUDIT_FORMATS:
        raise DataError(f"{path / layout.AUDIT} is not an audit file this version reads "
                        f"({', '.join(layout.READABLE_AUDIT_FORMATS)})")
    ledger = _checked(_json(path / layout.LEDGER), path / layout.LEDGER, ("events",), "privacy ledger")
    rounds = None
    if (path / layout.ROUNDS).is_file():
        try:
            rounds = pd.read_csv(path / layout.ROUNDS)
        except (OSError, ValueError, pd.errors.ParserError) as err:
            raise DataError(f"cannot read {path / layout.ROUNDS}: {err}") from None
    images = {}
    for folder in (path / layout.FIGURES, path / layout.AUDIT_FIGURES):
        for png in sorted(folder.glob("*.png")) if folder.is_dir() else []:
            images[png.stem] = data_uri(png)
    config = path / layout.CONFIG
    status = _json(path / layout.STATUS)
    return RunEvidence(path, metrics, audit, ledger, rounds,
                       config.read_text() if config.is_file() else None,
                       status if isinstance(status, dict) else None, images)
