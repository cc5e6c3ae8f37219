"""Run a federation on Flower: submit the bundled Flower app (``alignfl_audit/flower_bundle``) with
``flwr run`` and wait for the run directory it writes.

- ``engine.mode: simulation`` starts a private SuperLink with Flower's simulation runtime on free
  loopback ports, with its own ``FLWR_HOME``, and stops it afterwards; one virtual SuperNode per client.
- ``engine.mode: deployment`` submits to the SuperLink at ``engine.superlink``, whose SuperNodes run on
  the clients' hosts (``flower-supernode --node-config "partition-id=K data-root=DIR"``).

The run directory is made and headed here, before anything is submitted; the ServerApp (which runs
beside the SuperLink) writes the rest. Runtime dependency installation is off: every host has
alignfl-audit installed.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from alignfl_audit.config import ExperimentConfig
from alignfl_audit.orchestrate import prepare, write_run_header
from alignfl_audit.rundir import RunDir
from federation import run_layout as layout
from federation.errors import FederationError

BUNDLE = Path(__file__).with_name("flower_bundle")
CONNECTION = "alignfl"
FLOWER_LOG = "flower.log"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path) -> dict:
    env = dict(os.environ)
    # Flower starts its own helpers (flwr-serverapp, flwr-clientapp) by name: this interpreter's first
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_DISABLE_UPDATE_CHECK="1",
               PYTHONUNBUFFERED="1")
    return env


def _flower_bin(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(path).exists():
        raise FederationError(f"{name} is not installed; install alignfl-audit with its dependencies (flwr)")
    return path


def wait_reachable(address: str, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    """Wait until a SuperLink answers on ``address`` (its HTTP API), or fail with one line."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(f"http://{address}/health", timeout=2.0)
            return
        except httpx.HTTPError:
            pass
        if process is not None and process.poll() is not None:
            raise FederationError(f"{what} exited with code {process.returncode} before it could be reached")
        if time.monotonic() > deadline:
            raise FederationError(f"{what} at {address} could not be reached within {timeout:g} s "
                                  "(engine.connect_timeout)")
        time.sleep(0.2)


def start_superlink(home: Path, port: int, simulation: bool, log: Path) -> subprocess.Popen:
    cmd = [_flower_bin("flower-superlink"), "--insecure", "--isolation", "subprocess", "--host", "127.0.0.1",
           "--port", str(port), "--disable-runtime-dependency-installation"]
    if simulation:
        cmd.append("--simulation")
    return subprocess.Popen(cmd, env=_env(home), stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, 15)
        process.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, 9)
        except ProcessLookupError:
            pass


def write_connection(home: Path, address: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                      f'address = "{address}"\ninsecure = true\n')


def _toml_str(value: str) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def submit(home: Path, run: RunDir, cfg: ExperimentConfig, data_root, n_clients: int) -> subprocess.Popen:
    root = _toml_str(Path(data_root).resolve() if data_root else "")
    run_config = f"run-dir={_toml_str(run.path.resolve())} data-root={root} threads={torch.get_num_threads()}"
    cmd = [_flower_bin("flwr"), "run", str(BUNDLE), CONNECTION, "--stream", "--run-config", run_config]
    if cfg.engine.mode == "simulation":
        cmd += ["--federation-config", f"num-supernodes={max(1, n_clients)} client-resources-num-cpus={cfg.engine.client_cpus}"]
    log = run.file(FLOWER_LOG).open("ab")
    return subprocess.Popen(cmd, env=_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run_on_flower(cfg: ExperimentConfig, data_root=None, out=None, quiet: bool = False) -> RunDir:
    """Everything that can fail on bad input fails before the run directory is made."""
    _, partition, _ = prepare(cfg, data_root)
    home = Path(tempfile.mkdtemp(prefix="alignfl-flwr-"))
    superlink = None
    try:
        if cfg.engine.mode == "simulation":
            address = f"127.0.0.1:{_free_port()}"
            superlink = start_superlink(home, int(address.rsplit(':', 1)[1]), True, home / "superlink.log")
            wait_reachable(address, cfg.engine.connect_timeout, "the simulation SuperLink", superlink)
        else:
            address = cfg.engine.superlink
            wait_reachable(address, cfg.engine.connect_timeout, "the SuperLink")
        write_connection(home, address)
        run = RunDir.create(out, cfg.name, cfg.seed)
        flwr = None
        try:
            write_run_header(run, cfg, partition)
            run.log(f"submitted to the Flower {cfg.engine.mode} SuperLink at {address}")
            flwr = submit(home, run, cfg, data_root, len(partition.shards) if cfg.strategy_class.federated() else 0)
            _wait(run, flwr, superlink)
        except BaseException as err:
            if run.status().get("state") != "failed":
                run.set_status("failed", error=str(err) if isinstance(err, FederationError)
                               else f"{type(err).__name__}: {err}")
            _stop_flower_run(home, run)
            raise
        finally:
            stop(flwr)
        return run
    finally:
        stop(superlink)
        shutil.rmtree(home, ignore_errors=True)


def _stop_flower_run(home: Path, run: RunDir) -> None:
    """Ask the SuperLink to stop the run (its ServerApp may still be running on a real SuperLink)."""
    match = re.search(r"Successfully started run (\d+)", run.file(FLOWER_LOG).read_text(errors="replace")
                      if run.file(FLOWER_LOG).is_file() else "")
    if match:
        try:
            subprocess.run([_flower_bin("flwr"), "stop", match.group(1), CONNECTION], env=_env(home),
                           capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired, FederationError):
            pass  # the run directory already says failed; the ServerApp cannot mark it complete


def _wait(run: RunDir, flwr: subprocess.Popen, superlink: subprocess.Popen | None) -> None:
    """Until the ServerApp marks the run complete or failed (``flwr run --stream`` returns when the run ends)."""
    while True:
        state = run.status().get("state")
        if state == "complete":
            return
        if state == "failed":
            raise FederationError(run.status().get("error", "the Flower run failed"))
        if flwr.poll() is not None:
            time.sleep(1.0)  # the status file may land just after the log stream ends
            state = run.status().get("state")
            if state == "complete":
                return
            raise FederationError(run.status().get("error") or
                                  f"the Flower run ended without finishing the run directory; see {run.file(FLOWER_LOG)}")
        if superlink is not None and superlink.poll() is not None:
            raise FederationError(f"the simulation SuperLink exited with code {superlink.returncode}")
        time.sleep(0.5)
