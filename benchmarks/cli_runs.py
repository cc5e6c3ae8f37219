"""Running the product's CLI from a benchmark, in a fresh process, at a given thread count, against this
checkout or another worktree (a reference commit): the helpers the before/after benchmarks share."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit(worktree: str | Path) -> str:
    """The short commit a worktree is at."""
    return subprocess.run(["git", "-C", str(worktree), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def thread_env(threads: int, pythonpath: str | None = None, **extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **extra}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def run_cli(args: list[str], threads: int, pythonpath: str | None = None, prefix: list[str] | None = None,
            **extra_env: str) -> float:
    """``python [prefix...] -m alignfl_audit.cli ARGS`` (or ``python PREFIX... ARGS`` when ``prefix`` names a
    script) in the worktree ``pythonpath`` (this checkout when None); returns its wall time. A failure
    stops the benchmark with the command's last error lines."""
    cmd = [sys.executable, *(prefix or ["-m", "alignfl_audit.cli"]), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=thread_env(threads, pythonpath, **extra_env), capture_output=True, text=True,
                          cwd=pythonpath or ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    return wall


def median(xs):
    return round(statistics.median(xs), 2)
