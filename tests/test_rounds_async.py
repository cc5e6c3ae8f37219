"""Order-independent determinism, asynchronous and unreliable rounds, and config per strategy.

- Clients run in reversed order, after the global torch RNG was disturbed: the same shared bytes,
  ledger, rounds and metrics.
- Stragglers (the in-process engine's seeded delay model): a late reply is recorded with its
  staleness in the round it arrives, and the stale policy decides its weight (keep, drop, weight).
- Permanent dropout: a client that left receives nothing more; ALIGN-FL keeps synthesizing from its
  last decoder, FedAvg averages only the replies it gets.
- A setting that does not apply to the chosen strategy or engine is refused with one line naming it.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from alignfl_audit.cli import main
from alignfl_audit.config import from_dict
from alignfl_audit.orchestrate import run_experiment
from conftest import tiny_config
from federation.engines.inprocess import InProcessEngine
from federation.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

THREE = {"client_classes": [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]], "samples_per_class": 20, "holdout_per_class": 10}
SMALL = dict(model={"hidden": [32, 16]}, training={"batch_size": 32},
             metrics={"fid_samples": 100, "probe_every_round": False}, audit=False, report=False)


def _cfg(**kw) -> dict:
    return tiny_config(**{**SMALL, "partition": THREE, **kw})


def _rows(run: Path) -> list[dict]:
    with open(run / "rounds.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _shared(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted((run / "shared").rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ order-independent determinism
def test_reversed_client_order_and_a_disturbed_global_rng_change_nothing(tmp_path, monkeypatch):
    cfg = _cfg(name="order", training={"rounds": 2, "batch_size": 32},
               privacy={"mechanism": "dp-sgd", "target_epsilon": 4.0, "delta": 1e-5})
    a = run_experiment(from_dict(cfg), out=tmp_path / "a", quiet=True).path
    seen = []
    monkeypatch.setattr(InProcessEngine, "_order", lambda self, clients: seen.append(sorted(clients, reverse=True))
                        or sorted(clients, reverse=True))
    torch.manual_seed(12345)
    torch.rand(1000)
    b = run_experiment(from_dict(cfg), out=tmp_path / "b", quiet=True).path
    assert seen and seen[0] == [2, 1, 0]  # the clients really ran in reversed order
    assert _shared(a) == _shared(b)
    for name in ("privacy_ledger.json", "rounds.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert ma["utility"] == mb["utility"] and ma["privacy"] == mb["privacy"]


# ------------------------------------------------------------------ stragglers and stale policies
def _straggling(tmp_path, name, strategy="alignfl", **server) -> Path:
    cfg = _cfg(name=name, strategy={"name": strategy}, training={"rounds": 4, "batch_size": 32},
               engine={"name": "inprocess", "straggler_probability": 0.4, "straggler_max_delay": 2},
               server={"samples_per_client": 40, **server})
    return run_experiment(from_dict(cfg), out=tmp_path / name, quiet=True).path


@pytest.fixture(scope="module")
def straggling_keep(tmp_path_factory):
    return _straggling(tmp_path_factory.mktemp("keep"), "keep", stale_policy="keep")


def test_a_late_reply_is_recorded_with_its_staleness_where_it_arrives(straggling_keep):
    rows = _rows(straggling_keep)
    late = [(int(r["round"]), k) for r in rows for k in range(3) if r[f"client{k}_status"] == "late-reply"]
    assert late, "the seeded delay model made no straggler"
    for rnd, k in late:
        row = rows[rnd]
        assert int(row[f"client{k}_staleness"]) >= 1
        sent = rnd - int(row[f"client{k}_staleness"])
        assert rows[sent][f"client{k}_status"] == "no-reply"  # sent, no reply by that round's deadline
        for between in range(sent + 1, rnd):
            assert rows[between][f"client{k}_status"] == "busy"  # still working: sent nothing new
        # the reply is written where it arrived, as received, and says which round it answers
        assert (straggling_keep / "shared" / f"round-{rnd}" / f"client-{k}.safetensors").is_file()
        sidecar = json.loads((straggling_keep / "shared" / f"round-{rnd}" / f"client-{k}.json").read_text())
        assert sidecar["round"] == sent
    summary = json.loads((straggling_keep / "metrics.json").read_text())["participation"]
    assert sum(s.get("late-reply", 0) for s in summary["statuses"].values()) == len(late)


def test_the_delay_model_is_seeded(straggling_keep, tmp_path):
    again = _straggling(tmp_path, "keep", stale_policy="keep")
    assert (again / "rounds.csv").read_bytes() == (straggling_keep / "rounds.csv").read_bytes()
    assert _shared(again) == _shared(straggling_keep)


def test_stale_policies_weight_stale_decoders_as_configured(straggling_keep, tmp_path):
    drop = _straggling(tmp_path, "drop", stale_policy="drop", max_staleness=0)
    weight = _straggling(tmp_path, "weight", stale_policy="weight", staleness_decay=0.5)
    keep_rows, drop_rows, weight_rows = _rows(straggling_keep), _rows(drop), _rows(weight)
    # the three runs get the same arrivals (same seed); only the server's use of them differs
    assert [[r[f"client{k}_status"] for k in range(3)] for r in keep_rows] == \
        [[r[f"client{k}_status"] for k in range(3)] for r in drop_rows]
    ages = {}
    for r in keep_rows:
        for k in range(3):
            assert float(r[f"client{k}_weight"] or 1.0) == 1.0 or r[f"client{k}_weight"] == ""
    for rk, rd, rw in zip(keep_rows, drop_rows, weight_rows):
        for k in range(3):
            if rd[f"client{k}_weight"] == "":
                continue
            wd, ww = float(rd[f"client{k}_weight"]), float(rw[f"client{k}_weight"])
            assert wd in (0.0, 1.0)
            age = round(torch.log(torch.tensor(ww)).item() / torch.log(torch.tensor(0.5)).item())
            assert ww == pytest.approx(0.5 ** age)
            assert wd == (1.0 if age == 0 else 0.0)
            ages[(int(rk["round"]), k)] = age
    assert any(a > 0 for a in ages.values()), "no stale decoder was weighted"
    mk, md = (json.loads((r / "metrics.json").read_text())["utility"] for r in (straggling_keep, drop))
    assert mk != md  # dropping stale decoders changes what the server trains on


def test_fedavg_refuses_the_keep_policy_in_one_line():
    with pytest.raises(ConfigError, match=r"server.stale_policy 'keep' is not allowed for the fedavg strategy"):
        from_dict(_cfg(strategy={"name": "fedavg"}, server={"stale_policy": "keep"}))


# ------------------------------------------------------------------ permanent dropout
@pytest.mark.parametrize("strategy", ["alignfl", "fedavg"])
def test_a_client_that_leaves_for_good_gets_nothing_more(tmp_path, strategy):
    cfg = _cfg(name=f"leave-{strategy}", strategy={"name": strategy}, training={"rounds": 3, "batch_size": 32},
               server={"samples_per_client": 40, "dropout": {"client": 2, "from_round": 1}})
    run = run_experiment(from_dict(cfg), out=tmp_path / strategy, quiet=True).path
    rows = _rows(run)
    assert [r["client2_status"] for r in rows] == ["replied", "left", "left"]
    for rnd in (1, 2):
        assert not list((run / "shared" / f"round-{rnd}").glob("client-2.*"))
        assert not list((run / "shared" / f"round-{rnd}").glob("*to-client-2*"))
    if strategy == "alignfl":  # the server keeps synthesizing from the last decoder client 2 shared
        assert [float(r["client2_weight"]) for r in rows] == [1.0, 1.0, 1.0]
    else:  # FedAvg averages the replies it gets: client 2 is in no later average
        assert rows[0]["client2_weight"] == "1.0" and rows[1]["client2_weight"] == rows[2]["client2_weight"] == ""
    summary = json.loads((run / "metrics.json").read_text())["participation"]
    assert summary["departures"] == [{"client": 2, "from_round": 1}] and summary["statuses"]["2"]["left"] == 2


# ------------------------------------------------------------------ config per strategy and engine
@pytest.mark.parametrize("overrides,key", [
    ({"strategy": {"name": "fedavg"}, "server": {"sampling": "gmm"}}, "server.sampling"),
    ({"strategy": {"name": "centralized"}, "server": {"participation": 0.5}}, "server"),
    ({"strategy": {"name": "alignfl", "mu": 0.01}}, "strategy.mu"),
    ({"engine": {"name": "inprocess", "mode": "deployment"}}, "engine.mode"),
    ({"engine": {"name": "flower", "straggler_probability": 0.1}}, "engine.straggler_probability"),
], ids=["fedavg-sampling", "centralized-participation", "alignfl-mu", "inprocess-mode", "flower-stragglers"])
def test_a_setting_that_does_not_apply_is_refused_naming_the_key(overrides, key, tmp_path, capsys):
    cfg = _cfg(**overrides)
    with pytest.raises(ConfigError) as err:
        from_dict(cfg)
    assert key in str(err.value) and "\n" not in str(err.value)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_centralized_with_dp_and_gmm_gets_no_note_about_an_unshared_gmm(tmp_path):
    cfg = _cfg(strategy={"name": "centralized"}, privacy={"mechanism": "dp-sgd", "target_epsilon": 4.0,
                                                         "delta": 1e-5})
    cfg.pop("server", None)
    run = run_experiment(from_dict(cfg), out=tmp_path / "c", quiet=True).path
    ledger = json.loads((run / "privacy_ledger.json").read_text())
    assert ledger["formal_guarantee"] is True and "GMM" not in ledger["note"] and "gmm" not in ledger["note"]


def test_an_unknown_engine_is_one_line():
    with pytest.raises(ConfigError, match=r"unknown engine 'grpc'; choose one of \['inprocess', 'flower'\]"):
        from_dict(_cfg(engine={"name": "grpc"}))


def test_every_shipped_config_takes_the_flower_engine():
    for path in sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if "grid" in data or "runs" in data:  # a sweep file: each of its runs is a config
            continue
        assert from_dict({**data, "engine": {"name": "flower"}}).engine.name == "flower", path.name


def test_the_report_draws_every_round_status():
    from federation.rounds import STATUSES
    from reports.figures import STATUS_COLORS

    assert set(STATUS_COLORS) == set(STATUSES)
