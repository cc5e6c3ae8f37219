"""What produced a run: package versions, the project's git commit when known, the interpreter."""
from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("alignfl-audit", "torch", "torchvision", "opacus", "dp-accounting", "numpy", "scikit-learn", "scipy",
            "pandas", "matplotlib", "jinja2", "safetensors")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> dict | None:
    """The checkout's commit and whether it had uncommitted changes; None outside a git checkout."""
    if not (PROJECT_ROOT / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "uncommitted_changes": bool(dirty.stdout.strip())}


def provenance() -> dict:
    return {"packages": {name: _version(name) for name in PACKAGES}, "git": git_commit(),
            "python": platform.python_version(), "platform": platform.platform()}


def code_identity() -> dict:
    """Which code is running, as far as it can be told: the package version and the git checkout's commit
    (with its uncommitted-changes flag). A sweep continues a run from its checkpoint only under the same."""
    return {"version": _version("alignfl-audit"), "git": git_commit()}
