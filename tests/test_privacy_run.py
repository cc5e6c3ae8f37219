"""Tiny end-to-end runs with a privacy mechanism, on the embedded subset.

- DP-SGD with a target epsilon: the ledger records every client's every round, metrics.json
  reports per-client epsilons from all four accountants within the target, and
  ``alignfl-audit epsilon --ledger RUN`` recomputes the same numbers from the ledger alone.
- A client whose sigma was calibrated for R rounds refuses round R+1 (the budget is never overrun).
- LCD, LCD-spectral, the non-private median clip bound and decoder-only DP carry no formal
  guarantee: their privacy block holds no epsilon, only the reason.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignfl_audit.accounting import ACCOUNTANTS, RELATIONS, client_epsilons, epsilons
from alignfl_audit.cli import main as cli_main
from alignfl_audit.config import from_dict
from alignfl_audit.orchestrate import client_setups, load_data, new_ledger, run_experiment
from conftest import tiny_config
from federation.client import Client
from federation.data.partition import make_partition
from federation.messages import load_uplink
from federation.privacy.budget import EPSILON_TOLERANCE, spent_epsilon

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TARGET_EPSILON = 3.0
DELTA = 1e-5
ROUNDS = 2

BASE = tiny_config(
    name="privacy-run",
    partition={"client_classes": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], "samples_per_class": 60,
               "holdout_per_class": 20, "outliers": {"count": 5, "client": 0, "holdout": 10}},
    model={"hidden": [32, 16]},
    training={"rounds": ROUNDS, "batch_size": 32},
    server={"samples_per_client": 50},
    metrics={"fid_samples": 100, "probe_every_round": False},
)
NO_GUARANTEE = {
    "dp-with-latent-gmm": {"mechanism": "dp-sgd", "target_epsilon": TARGET_EPSILON, "delta": DELTA},
    "lcd": {"mechanism": "lcd", "lcd_lambda": 1.0},
    "lcd-spectral": {"mechanism": "lcd-spectral"},
    "median-nonprivate": {"mechanism": "dp-sgd", "noise_multiplier": 1.0, "clipping": "median-nonprivate"},
    "scope-decoder": {"mechanism": "dp-sgd", "target_epsilon": TARGET_EPSILON, "delta": DELTA, "scope": "decoder"},
}


def config(privacy: dict, name: str) -> dict:
    return {**copy.deepcopy(BASE), "name": name, "privacy": privacy}


@pytest.fixture(autouse=True, scope="module")
def _env(one_torch_thread):
    """One intra-op thread (tiny models on busy cores); the conftest's session fixture provides the
    embedded subset (no $ALIGNFL_DATA_DIR) and a private cache dir."""


@pytest.fixture(scope="module")
def dp_run(_env, tmp_path_factory):
    """(run dir, a literal `alignfl-audit epsilon --ledger RUN --json` process started right away)."""
    cfg = from_dict(config({"mechanism": "dp-sgd", "target_epsilon": TARGET_EPSILON, "delta": DELTA}, "dp"))
    run = run_experiment(cfg, out=tmp_path_factory.mktemp("dp") / "run", quiet=True)
    proc = subprocess.Popen([sys.executable, "-m", "alignfl_audit.cli", "epsilon", "--ledger", str(run.path),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PROJECT_ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    yield run.path, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module", params=list(NO_GUARANTEE))
def no_guarantee_run(_env, request, tmp_path_factory):
    cfg = config(NO_GUARANTEE[request.param], request.param)
    if request.param == "dp-with-latent-gmm":  # DP-SGD on the decoders, plus an uncovered extra artifact
        cfg["server"] = {**cfg["server"], "sampling": "gmm", "gmm_components": 2}
    cfg = from_dict(cfg)
    run = run_experiment(cfg, out=tmp_path_factory.mktemp(request.param) / "run", quiet=True)
    return request.param, run.path


def read(path: Path, name: str):
    return json.loads((path / name).read_text())


def epsilon_cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main(["epsilon", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------ DP-SGD with a formal guarantee
def test_dp_run_ledger_has_one_event_per_client_per_round(dp_run):
    path, _ = dp_run
    assert read(path, "status.json")["state"] == "complete"
    ledger = read(path, "privacy_ledger.json")
    assert ledger["mechanism"] == "dp-sgd" and ledger["formal_guarantee"] is True
    assert ledger["delta"] == DELTA and ledger["target_epsilon"] == TARGET_EPSILON
    events = ledger["events"]
    clients = ledger["clients"]
    assert sorted(clients) == ["0", "1"]
    assert sorted((e["client"], e["round"]) for e in events) == [(c, r) for c in (0, 1) for r in range(ROUNDS)]
    for e in events:
        plan = clients[str(e["client"])]
        n = plan["n"]
        assert n == (305 if e["client"] == 0 else 300)  # 5 classes x 60 (+ 5 outliers on client 0)
        assert e["sample_rate"] == pytest.approx(32 / n) == plan["sample_rate"]
        assert e["noise_multiplier"] == plan["noise_multiplier"] > 0
        assert e["steps"] == int(n / 32) == plan["planned_steps"] // ROUNDS  # steps per epoch x 1 local epoch
        # grad_sample_mode auto (the default) is recorded as the mode that ran: bk for the mlp VAE
        assert e["clipping"] == "adaptive" and e["scope"] == "full" and e["grad_sample_mode"] == "bk"
        assert e["clip_bound_start"] > 0 and e["clip_bound_end"] > 0
    for c in (0, 1):  # the adaptive bound carries over from one round to the next
        first, second = sorted((e for e in events if e["client"] == c), key=lambda e: e["round"])
        assert second["clip_bound_start"] == first["clip_bound_end"]


def test_dp_run_metrics_report_every_accountant_within_the_target(dp_run):
    path, _ = dp_run
    block = read(path, "metrics.json")["privacy"]
    assert block["formal_guarantee"] is True and "epsilon_withheld" not in block
    assert block["delta"] == DELTA and block["target_epsilon"] == TARGET_EPSILON
    ledger = read(path, "privacy_ledger.json")
    assert sorted(block["clients"]) == ["0", "1"]
    for cid, both in block["clients"].items():
        # the budget is held under replace-one, the headline's relation (the record count travels in every upload)
        replace_one, res = both["relations"]["replace-one"], both["relations"]["add-remove"]
        assert both["headline"] == {"relation": "replace-one", **replace_one["headline"]}
        assert set(replace_one["accountants"]) == set(RELATIONS["replace-one"])
        for name, r in replace_one["accountants"].items():
            assert r["error"] is None and r["epsilon"] > 0, (cid, name, r)
        # calibrated for the whole participation: the headline is within the target and close to it
        assert TARGET_EPSILON - 0.05 <= replace_one["headline"]["epsilon"] <= TARGET_EPSILON
        assert replace_one["headline"]["epsilon"] == min(r["epsilon"] for r in replace_one["accountants"].values())
        assert replace_one["flags"] == []
        # add/remove (n treated as public) is smaller, by every one of its four accountants
        assert set(res["accountants"]) == set(ACCOUNTANTS)
        for name, r in res["accountants"].items():
            assert r["error"] is None and 0 < r["epsilon"] < replace_one["headline"]["epsilon"], (cid, name, r)
        assert res["headline"]["epsilon"] == min(r["epsilon"] for r in res["accountants"].values())
        assert res["flags"] == []
        # the numbers are a pure function of the ledger's events
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in ledger["events"]
                   if e["client"] == int(cid)]
        assert both == client_epsilons(history, DELTA)
    assert block["relation"] == "replace-one" and "record count" in block["relation_reason"]
    top = max(block["clients"], key=lambda c: block["clients"][c]["headline"]["epsilon"])
    assert block["headline"]["client"] == top and block["headline"]["relation"] == "replace-one"
    assert block["headline"]["epsilon"] == block["clients"][top]["headline"]["epsilon"]
    assert block["headline"]["add_remove_epsilon"] == max(
        c["relations"]["add-remove"]["headline"]["epsilon"] for c in block["clients"].values())


def test_epsilon_cli_recomputes_metrics_from_the_ledger(dp_run, capsys):
    path, proc = dp_run
    block = read(path, "metrics.json")["privacy"]
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["formal_guarantee"] is True
    assert result["clients"].keys() == block["clients"].keys()
    for cid, res in result["clients"].items():
        for relation, names in RELATIONS.items():
            for name in names:
                assert res["relations"][relation]["accountants"][name]["epsilon"] == pytest.approx(
                    block["clients"][cid]["relations"][relation]["accountants"][name]["epsilon"], rel=1e-9)
        assert res["headline"]["accountant"] == block["clients"][cid]["headline"]["accountant"]
        assert res["headline"]["epsilon"] == pytest.approx(block["clients"][cid]["headline"]["epsilon"], rel=1e-9)
    # the human-readable form names each client's headline (printing only: the numbers were checked above)
    import alignfl_audit.accounting as accounting

    mp = pytest.MonkeyPatch()
    mp.setattr(accounting, "ledger_epsilons", lambda ledger: block)
    try:
        code, text, _ = epsilon_cli(capsys, "--ledger", str(path))
    finally:
        mp.undo()
    assert code == 0
    assert "formal guarantee: yes" in text
    for cid, res in block["clients"].items():
        assert f"client {cid}:" in text
        assert f"headline: epsilon = {res['headline']['epsilon']:.4f}" in text


def test_a_client_never_overruns_its_budget(tmp_path):
    """sigma calibrated for R rounds: rounds 1..R train and are recorded, round R+1 is refused."""
    cfg = from_dict(config({"mechanism": "dp-sgd", "target_epsilon": TARGET_EPSILON, "delta": DELTA,
                            "clipping": "fixed"}, "budget"))
    data = load_data(cfg)
    partition = make_partition(cfg.partition, data.train.labels, data.outlier_train.labels, cfg.data.dataset,
                               cfg.outlier_dataset, cfg.seed)
    setup = client_setups(cfg, data, partition, only=0)[0]
    state, losses, events = None, [], []
    for rnd in range(ROUNDS + 1):  # the client is rebuilt from its saved state every round, as engines do
        client = Client(setup, state, rnd)
        loss, spent_now = client.train_round()
        losses.append(loss)
        events += spent_now
        state = client.state_dict()
    assert all(isinstance(v, float) and np.isfinite(v) for v in losses[:ROUNDS]), losses
    assert losses[ROUNDS] is None and client.budget_exhausted
    loss, history = Client(setup, state, ROUNDS + 1).train_round()  # and stays refused, trains nothing more
    assert loss is None and [e.round for e in history] == list(range(ROUNDS))  # its report repeats its history
    ledger = new_ledger(cfg, [setup], [])
    ledger.merge(events)  # every round's report repeated the history: the ledger keeps one event per round
    assert len(events) > ROUNDS and len(ledger.events) == ROUNDS
    assert [e.round for e in ledger.events] == list(range(ROUNDS))
    spent = spent_epsilon(cfg.privacy, ledger.history(0))
    assert spent <= TARGET_EPSILON + EPSILON_TOLERANCE
    assert client_epsilons(ledger.history(0), DELTA)["headline"]["epsilon"] <= TARGET_EPSILON  # replace-one
    # one more round would have overrun it
    planned = (setup.dp_plan.noise_multiplier, setup.dp_plan.sample_rate, setup.dp_plan.steps_per_epoch)
    assert spent_epsilon(cfg.privacy, ledger.history(0) + [planned]) > TARGET_EPSILON + EPSILON_TOLERANCE


# ------------------------------------------------------------------ mechanisms without a formal guarantee
def _epsilon_values(obj, path="privacy"):
    """Every place an epsilon value (not the configured target) appears."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("epsilon", "accountants", "headline") or (k != "target_epsilon" and "epsilon" in k
                                                               and isinstance(v, (int, float))):
                found.append(f"{path}.{k}")
            found += _epsilon_values(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _epsilon_values(v, f"{path}[{i}]")
    return found


def test_no_formal_guarantee_means_no_epsilon(no_guarantee_run, capsys):
    name, path = no_guarantee_run
    assert read(path, "status.json")["state"] == "complete"
    metrics = read(path, "metrics.json")
    block = metrics["privacy"]
    assert block["formal_guarantee"] is False
    assert block["clients"] == {} and block["target_epsilon"] is None and block["delta"] is None
    assert "no formal DP guarantee" in block["epsilon_withheld"]
    assert _epsilon_values(block) == []
    ledger = read(path, "privacy_ledger.json")
    assert ledger["formal_guarantee"] is False
    if name in ("median-nonprivate", "scope-decoder", "dp-with-latent-gmm"):  # DP-SGD ran and was recorded
        assert len(ledger["events"]) == 2 * ROUNDS
    else:
        assert ledger["events"] == []
    code, text, err = epsilon_cli(capsys, "--ledger", str(path))
    assert code == 0, err
    assert "no epsilon" in text and "no formal DP guarantee" in text
    assert "headline" not in text
    code, text, err = epsilon_cli(capsys, "--ledger", str(path), "--json")
    assert code == 0 and json.loads(text)["clients"] == {}


def test_only_lcd_spectral_uploads_carry_the_spectral_spec(no_guarantee_run):
    name, path = no_guarantee_run
    spectral = name == "lcd-spectral"
    sidecars = sorted((path / "shared").glob("round-*/client-*.json"))
    assert len(sidecars) == 2 * ROUNDS
    for sidecar in sidecars:
        assert json.loads(sidecar.read_text())["spec"]["spectral_norm"] is spectral
        upload = load_uplink(sidecar.with_suffix(".safetensors"))  # the server rebuilds it from the spec
        assert upload.spec["spectral_norm"] is spectral
        assert any("parametrizations" in k for k in upload.tensors) is spectral
    assert read(path, "metrics.json")["rejected_uploads"] == []
