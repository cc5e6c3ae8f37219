"""The run directory: the contract between training, audit and report.

Files are written atomically (write, then rename). ``status.json`` says whether a run is
``running``, ``failed`` or ``complete``; ``metrics.json`` is written only when a run completes,
so a run directory without both never looks complete.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import time
from pathlib import Path

from federation import run_layout as layout


def atomic_write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)
    return path


def _jsonable(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialize {type(obj).__name__}")


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, out: str | Path | None, name: str, seed: int, base: str | Path = "runs") -> "RunDir":
        """Make a fresh directory; an existing one is never reused or overwritten."""
        if out is not None:
            path = Path(out)
            if path.exists() and any(path.iterdir()):
                from federation.errors import ConfigError
                raise ConfigError(f"output directory {path} already exists and is not empty; choose another --out")
        else:
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "run"  # a name is not a path
            stem = Path(base) / f"{safe}-seed{seed}"
            path, n = stem, 1
            while path.exists():
                n += 1
                path = stem.with_name(f"{stem.name}-{n}")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        run.set_status("running")
        return run

    def file(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    def write_json(self, name: str, obj) -> Path:
        return atomic_write(self.file(name), json.dumps(obj, indent=2, default=_jsonable) + "\n")

    def read_json(self, name: str):
        return json.loads(self.file(name).read_text())

    def write_csv(self, name: str, rows: list[dict]) -> Path:
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        return atomic_write(self.file(name), buf.getvalue())

    def shared_round(self, rnd: int) -> Path:
        return self.file(layout.shared_round(rnd))

    def log(self, message: str) -> None:
        """Append a timestamped line to the run's log file (run.log)."""
        with open(self.file(layout.LOG), "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {message}\n")

    def set_status(self, state: str, **info) -> None:
        if state == "complete" and self.status().get("state") == "failed":
            from federation.errors import FederationError

            raise FederationError(f"{self.path} was marked failed ({self.status().get('error', 'no reason')}); "
                                  "it is not marked complete")
        self.write_json(layout.STATUS, {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info})
        self.log(f"status {state}" + "".join(f" {k}={v}" for k, v in info.items()))

    def resolved_config_data(self) -> dict:
        """The run's config.resolved.yaml as a mapping, as written (not yet migrated or validated)."""
        import yaml

        from federation.errors import ConfigError

        path = self.file(layout.CONFIG)
        if not path.is_file():
            raise ConfigError(f"{self.path} is not a run directory (no {layout.CONFIG})")
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read the run's resolved config {path}: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} is not a resolved config (not a YAML mapping)")
        return data

    def status(self) -> dict:
        """The recorded status ({} while none is written or it cannot be read)."""
        try:
            data = self.read_json(layout.STATUS)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def is_complete(self) -> bool:
        try:
            return self.read_json(layout.STATUS)["state"] == "complete" and self.file(layout.METRICS).is_file()
        except (OSError, ValueError, KeyError, TypeError):
            return False
