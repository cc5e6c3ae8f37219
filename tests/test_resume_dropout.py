"""Crash-resume and client dropout: a run killed with SIGKILL mid-round and resumed ends exactly like an
uninterrupted run (metrics, ledger, rounds); the ledger is never double-counted; a client that sits a
round out spends no privacy budget in it; a client that never took part contributes nothing."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from alignfl_audit.cli import main
from alignfl_audit.config import from_dict
from alignfl_audit.orchestrate import run_experiment
from conftest import PROJECT_ROOT, Federation, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DP = {"mechanism": "dp-sgd", "target_epsilon": 8.0, "delta": 1e-5, "clipping": "adaptive"}


def _cli(*args: str, wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "alignfl_audit.cli", *args]
    if wait:
        return subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _rows(run):
    with open(run / "rounds.csv") as fh:
        return list(csv.DictReader(fh))


def test_sigkill_mid_round_then_resume_equals_an_uninterrupted_run(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(
        name="resume", training={"rounds": 6, "local_epochs": 3, "batch_size": 32},
        partition={"samples_per_class": 80, "outliers": {"count": 10, "client": 0, "holdout": 10}},
        server={"participation": 0.7}, privacy=DP)))
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = _cli("run", str(cfg), "--out", str(whole), "--quiet")
    assert done.returncode == 0, done.stderr

    proc = _cli("run", str(cfg), "--out", str(broken), "--quiet", wait=False)
    deadline = time.monotonic() + 300
    # A round here takes ~0.2 s: kill as soon as round 0 is checkpointed, so five rounds of margin
    # separate the kill from the run's end (a fixed sleep after round 1 once outlasted the whole run).
    while time.monotonic() < deadline:
        if (broken / "checkpoints" / "latest.pt").is_file() and (broken / "rounds.csv").is_file() \
                and len(_rows(broken)) >= 1:
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    status = json.loads((broken / "status.json").read_text())
    assert status["state"] == "running" and not (broken / "metrics.json").exists()  # not mistaken for complete
    killed_at = len(_rows(broken))
    assert 1 <= killed_at < 6, "the run finished before it could be killed"

    resumed = _cli("run", "--resume", str(broken), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (whole, broken))
    assert a["utility"] == b["utility"]
    assert a["privacy"] == b["privacy"]
    la, lb = (json.loads((r / "privacy_ledger.json").read_text()) for r in (whole, broken))
    assert la == lb  # same events: nothing lost, nothing counted twice
    assert _rows(whole) == _rows(broken)
    assert "resumed after round" in (broken / "run.log").read_text()
    again = _cli("run", "--resume", str(broken), "--quiet")
    assert again.returncode == 2 and "already complete" in again.stderr


def test_dropped_clients_spend_no_budget_and_never_seen_clients_contribute_nothing(tmp_path):
    cfg = from_dict(tiny_config(name="dropout", training={"rounds": 5}, server={"participation": 0.4},
                                privacy=DP))
    run = run_experiment(cfg, out=tmp_path / "run", quiet=True).path
    rows = _rows(run)
    ledger = json.loads((run / "privacy_ledger.json").read_text())
    took_part = {k: [int(r["round"]) for r in rows if r[f"client{k}_participated"] == "True"] for k in range(3)}
    for k in range(3):  # selected for a round = trained and replied in it (no delays, no faults here)
        assert took_part[k] == [int(r["round"]) for r in rows if r[f"client{k}_status"] == "replied"]
        assert all(r[f"client{k}_status"] == "not-selected" for r in rows if int(r["round"]) not in took_part[k])
    assert any(len(v) < 5 for v in took_part.values()), "participation 0.4 over 15 draws dropped nobody"
    for k in range(3):
        spent = [e["round"] for e in ledger["events"] if e["client"] == k]
        assert spent == took_part[k]  # one DP event per round taken part in, none otherwise
        for rnd in range(5):
            exists = (run / "shared" / f"round-{rnd}" / f"client-{k}.safetensors").is_file()
            assert exists == (rnd in took_part[k])
            # the round's downlink names exactly the selected clients
            downs = [json.loads(p.read_text())["recipients"] for p in (run / "shared" / f"round-{rnd}").glob(
                "server-to-client*.json")]
            assert (k in sum(downs, [])) == (rnd in took_part[k])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["participation"]["probability"] == 0.4
    assert metrics["participation"]["rounds_per_client"] == {str(k): len(v) for k, v in took_part.items()}
    # the metrics' epsilon comes from exactly those events: fewer rounds, less epsilon
    eps = {k: v["headline"]["epsilon"] for k, v in metrics["privacy"]["clients"].items()}
    fewest, most = min(took_part, key=lambda k: len(took_part[k])), max(took_part, key=lambda k: len(took_part[k]))
    if len(took_part[fewest]) < len(took_part[most]):
        assert eps[str(fewest)] < eps[str(most)]


def test_a_client_that_never_takes_part_contributes_nothing(tmp_path):
    fed = Federation(tiny_config(partition={"client_classes": [[0, 1], [2, 3], [4, 5], [6, 7]]},
                                 server={"participation": 0.5}), tmp_path)
    seen, skipped = set(), 0
    for rnd in range(3):
        record = fed.round(rnd)
        replied = {k for k in range(4) if record.clients[k].status == "replied"}
        assert all(record.clients[k].status == "not-selected" for k in range(4) if k not in replied)
        skipped += 4 - len(replied)
        seen |= replied
        assert set(fed.strategy.server.decoders) == seen  # only clients that ever took part
        x, y = fed.strategy.last_synthetic if seen else (None, torch.zeros(0))
        assert set(y.tolist()) == seen
    assert skipped > 0, "participation 0.5 over 12 draws selected everybody: the test shows nothing"


def test_participation_must_be_a_probability(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(server={"participation": 0.0})))
    assert main(["run", str(cfg), "--quiet", "--out", str(tmp_path / "o")]) == 2
    assert "server.participation must be in (0, 1]" in capsys.readouterr().err
