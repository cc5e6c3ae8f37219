"""Shared fixtures for the federation foundation tests.

* Every test runs with ``ALIGNFL_CACHE_DIR`` pointing into a session temp dir, so nothing is
  written to ``~/.cache``; ``ALIGNFL_DATA_DIR`` is removed for the session so that tiny runs use
  the embedded subset (its original value is still offered through ``full_data_root``).
* ``full_data_root``: the full MNIST/Fashion-MNIST IDX files (``../shared/datasets`` next to the
  project, or ``$ALIGNFL_DATA_DIR``); tests that need them skip only if neither has them.
* ``tiny_config(**overrides)``: a config dict for ``alignfl_audit.config.from_dict`` that runs on
  the embedded subset in seconds.
* ``quickstart_run``: ``alignfl-audit run configs/quickstart.yaml --out TMP --quiet`` as a
  subprocess. It is the one slow workload of the suite, so when a selected test needs it, it is
  started in the background at the beginning of the session and collected when the test asks.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = PROJECT_ROOT.parent / "shared" / "datasets"
_ENV_KEYS = ("ALIGNFL_CACHE_DIR", "ALIGNFL_DATA_DIR")
_ORIGINAL_ENV = {k: os.environ.get(k) for k in _ENV_KEYS}

TINY_CONFIG = {
    "name": "tiny",
    "seed": 0,
    "data": {"dataset": "mnist", "allow_embedded": True},
    "partition": {
        "scheme": "class_disjoint",
        "client_classes": [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]],
        "samples_per_class": 30,
        "holdout_per_class": 10,
        "outliers": {"count": 0, "client": 0, "holdout": 0},
    },
    "model": {"arch": "mlp", "latent_dim": 2, "hidden": [64, 32]},
    "training": {"rounds": 1, "local_epochs": 1, "batch_size": 64, "lr": 1.0e-3, "lambda_kl": 1.0},
    "server": {"samples_per_client": 60, "epochs": 1, "sampling": "prior"},
    "strategy": {"name": "alignfl"},
    "metrics": {"fid_samples": 200, "domain_cnn_epochs": 1, "tstr_epochs": 1, "probe_max_iter": 200,
                "probe_every_round": True, "figures": False},
}


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_config(**overrides) -> dict:
    """A config dict for ``from_dict`` on the embedded subset; nested dicts are merged, e.g.
    ``tiny_config(seed=1, strategy={"name": "fedavg"})``. The base's ``server`` keys that the chosen
    strategy does not declare are left out (keys given in ``overrides`` are always kept)."""
    import dataclasses

    from federation.strategies import STRATEGIES

    out = _merge(TINY_CONFIG, overrides)
    cls = STRATEGIES.get(out.get("strategy", {}).get("name"))
    if cls is not None:
        declared = {f.name for f in dataclasses.fields(cls.ServerSettings)} if cls.ServerSettings else set()
        given = set(overrides.get("server") or {})
        server = {k: v for k, v in out.get("server", {}).items() if k in declared or k in given}
        if server or cls.ServerSettings is not None:
            out["server"] = server
        else:
            out.pop("server", None)
    return out


class Federation:
    """A strategy and the in-process engine exactly as the orchestrator builds them, without a run
    directory: ``round(r)`` runs round r, writing its messages under ``root/round-r``."""

    def __init__(self, cfg_dict: dict, root):
        from alignfl_audit.config import from_dict
        from alignfl_audit.orchestrate import build_strategy, inprocess_engine, prepare

        self.cfg = from_dict(cfg_dict)
        _, _, self.setups = prepare(self.cfg)
        self.strategy = build_strategy(self.cfg, self.setups)
        self.engine = inprocess_engine(self.cfg, self.setups)
        self.root = root

    def round(self, rnd: int):
        from federation.rounds import run_round
        from federation.strategies.base import departures

        record, _ = run_round(rnd, self.strategy, self.engine, self.root / f"round-{rnd}",
                              departures(self.cfg.server), self.strategy.ctx.client_ids)
        return record

    def client(self, k: int, rnd: int):
        """Client k as its saved state stands before round ``rnd`` (built by the strategy's client side)."""
        return self.engine.handler.make_client(self.setups[k], self.engine.states[k], rnd)


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    """Session-wide environment: a private cache dir, and no $ALIGNFL_DATA_DIR leaking into runs."""
    cache = tmp_path_factory.mktemp("alignfl-cache")
    os.environ["ALIGNFL_CACHE_DIR"] = str(cache)
    os.environ.pop("ALIGNFL_DATA_DIR", None)
    try:
        yield cache
    finally:
        for key, value in _ORIGINAL_ENV.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _has_full_data(root: Path) -> bool:
    from federation.data.sources import _has_dataset

    return root.is_dir() and all(_has_dataset(root, d) for d in ("mnist", "fashion_mnist"))


@pytest.fixture(scope="session")
def full_data_root() -> Path:
    candidates = [SHARED_DATASETS.resolve()]
    if _ORIGINAL_ENV["ALIGNFL_DATA_DIR"]:
        candidates.append(Path(_ORIGINAL_ENV["ALIGNFL_DATA_DIR"]).expanduser().resolve())
    for root in candidates:
        if _has_full_data(root):
            return root
    pytest.skip(f"full MNIST/Fashion-MNIST not found in {' or '.join(map(str, candidates))}")


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that train tiny models in-process: one intra-op thread, restored afterwards. The
    models are tiny, and on a shared, oversubscribed machine a second thread mostly waits at
    barriers. Opt-in per module (it changes float summation order, which some tests may pin)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    """The ``tiny_config`` factory as a fixture."""
    return tiny_config


# ------------------------------------------------------------------------------- the quickstart
@dataclass
class QuickstartRun:
    returncode: int
    stdout: str
    stderr: str
    out: Path
    seconds: float  # wall time of the subprocess, start to exit


def pytest_collection_finish(session):
    # after -k/-m deselection: start the quickstart only if a test that will run needs it
    session.config._alignfl_wants_quickstart = any("quickstart_run" in getattr(item, "fixturenames", ())
                                                   for item in session.items)


@pytest.fixture(scope="session", autouse=True)
def _background_quickstart(request, _isolated_env, tmp_path_factory):
    if not getattr(request.config, "_alignfl_wants_quickstart", False):
        yield None
        return
    base = tmp_path_factory.mktemp("quickstart")
    out = base / "run"
    stdout, stderr = open(base / "stdout", "w"), open(base / "stderr", "w")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "alignfl_audit.cli", "run", "configs/quickstart.yaml",
                             "--out", str(out), "--quiet"], stdout=stdout, stderr=stderr, text=True,
                            cwd=PROJECT_ROOT, env=dict(os.environ))
    state = {"proc": proc, "base": base, "out": out}

    def wait():
        proc.wait()
        state["seconds"] = time.perf_counter() - started

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    state["waiter"] = waiter
    try:
        yield state
    finally:
        if proc.poll() is None:  # the session ended early (e.g. -x): stop the run this fixture started
            proc.kill()
            proc.wait()
        stdout.close()
        stderr.close()


@pytest.fixture(scope="session")
def quickstart_run(_background_quickstart) -> QuickstartRun:
    state = _background_quickstart
    assert state is not None
    state["waiter"].join(timeout=900)
    assert not state["waiter"].is_alive(), "the quickstart did not finish within 15 minutes"
    return QuickstartRun(state["proc"].returncode, (state["base"] / "stdout").read_text(),
                         (state["base"] / "stderr").read_text(), state["out"], state["seconds"])
