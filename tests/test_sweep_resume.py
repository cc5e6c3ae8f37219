"""A sweep interrupted mid-run loses no finished work: a run stopped mid-training continues from its
last round's checkpoint and ends exactly like an uninterrupted one; a run whose training finished but
whose audit did not is only audited; an edited entry is still redone from scratch."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from alignfl_audit import orchestrate
from alignfl_audit.cli import main
from conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

AUDIT = {"members_per_client": 10, "latent_fit_steps": 3, "latent_fit_init": 32, "latent_fit_restarts": 1,
         "generated_samples": 100, "bootstrap": 5, "inliers": 5, "lipschitz_prior_points": 8,
         "lipschitz_ascent_steps": 1, "reference_models": False, "lipschitz_rounds": 1}
DP = {"mechanism": "dp-sgd", "target_epsilon": 8.0, "delta": 1e-5}


def _sweep(tmp_path, out: str, **settings) -> str:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_config(
        audit=AUDIT, privacy=DP, training={"rounds": 4}, metrics={"probe_every_round": False})))
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump({"name": "mini", "base": "base.yaml", "out": str(tmp_path / out),
                                    "runs": [{"label": "dp", **({"set": settings} if settings else {})}]}))
    return str(path)


def _json(path):
    return json.loads(path.read_text())


def test_an_interrupted_sweep_resumes_its_run_and_audits_a_trained_one(tmp_path, monkeypatch, capsys):
    assert main(["sweep", _sweep(tmp_path, "whole"), "--quiet"]) == 0
    whole = tmp_path / "whole" / "dp-seed0"

    real = orchestrate.save_checkpoint

    def crash_after_round_1(run, rnd, *args):
        path = real(run, rnd, *args)
        if rnd == 1:
            raise RuntimeError("the machine went away")
        return path

    monkeypatch.setattr(orchestrate, "save_checkpoint", crash_after_round_1)
    sweep = _sweep(tmp_path, "broken")
    assert main(["sweep", sweep, "--quiet"]) == 1
    broken = tmp_path / "broken" / "dp-seed0"
    assert not (broken / "metrics.json").exists() and (broken / "checkpoints" / "latest.pt").is_file()
    monkeypatch.setattr(orchestrate, "save_checkpoint", real)
    capsys.readouterr()

    assert main(["sweep", sweep, "--quiet"]) == 0
    assert "dp-seed0: resumed from its checkpoint, trained and audited" in capsys.readouterr().out
    assert not list((tmp_path / "broken").glob("dp-seed0.replaced-*"))  # continued in place, not redone
    assert "resumed after round 1" in (broken / "run.log").read_text()
    a, b = _json(whole / "metrics.json"), _json(broken / "metrics.json")
    assert a["utility"] == b["utility"] and a["privacy"] == b["privacy"]
    assert _json(whole / "privacy_ledger.json") == _json(broken / "privacy_ledger.json")  # no round counted twice
    assert (broken / "audit.json").is_file() and not (broken / "checkpoints").exists()

    (broken / "audit.json").unlink()  # training complete, audit lost
    trained = (broken / "metrics.json").read_bytes()
    assert main(["sweep", sweep, "--quiet"]) == 0
    assert "dp-seed0: training found complete, audited" in capsys.readouterr().out
    assert (broken / "metrics.json").read_bytes() == trained and (broken / "audit.json").is_file()
    assert _json(broken / "audit.json")["mia"] == _json(whole / "audit.json")["mia"]  # the same audit


def test_a_checkpoint_of_an_edited_entry_is_not_resumed(tmp_path, monkeypatch, capsys):
    real = orchestrate.save_checkpoint

    def crash_after_round_0(run, rnd, *args):
        real(run, rnd, *args)
        raise RuntimeError("stopped")

    monkeypatch.setattr(orchestrate, "save_checkpoint", crash_after_round_0)
    assert main(["sweep", _sweep(tmp_path, "out"), "--quiet"]) == 1
    monkeypatch.setattr(orchestrate, "save_checkpoint", real)
    run = tmp_path / "out" / "dp-seed0"
    assert (run / "checkpoints" / "latest.pt").is_file()
    shutil.copy(run / "checkpoints" / "latest.pt", tmp_path / "kept.pt")
    capsys.readouterr()
    assert main(["sweep", _sweep(tmp_path, "out", **{"training.lambda_kl": 0.5}), "--quiet"]) == 0
    assert "dp-seed0: trained and audited" in capsys.readouterr().out
    assert (tmp_path / "out" / "dp-seed0.replaced-1" / "checkpoints" / "latest.pt").is_file()  # kept aside
    assert "resumed" not in (run / "run.log").read_text()
