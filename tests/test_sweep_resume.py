"""A sweep run again loses no finished work: a run stopped mid-training continues from its last round's
checkpoint and ends exactly like an uninterrupted one; a run whose training finished but whose audit did
not is only audited; the progress bar expects only what is left. A checkpoint of an edited entry, of
other code, or one that cannot be read is not continued: the run is moved aside and redone."""
from __future__ import annotations

import io
import json
from contextlib import contextmanager

import pytest
import yaml

from alignfl_audit import orchestrate
from alignfl_audit import sweep as sweep_module
from alignfl_audit.cli import main
from conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

AUDIT = {"members_per_client": 10, "latent_fit_steps": 3, "latent_fit_init": 32, "latent_fit_restarts": 1,
         "generated_samples": 100, "bootstrap": 5, "inliers": 5, "lipschitz_prior_points": 8,
         "lipschitz_ascent_steps": 1, "reference_models": False, "lipschitz_rounds": 1}
DP = {"mechanism": "dp-sgd", "target_epsilon": 8.0, "delta": 1e-5}


def _sweep(tmp_path, out: str, **settings) -> str:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_config(
        audit=AUDIT, privacy=DP, training={"rounds": 3}, metrics={"probe_every_round": False})))
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump({"name": "mini", "base": "base.yaml", "out": str(tmp_path / out),
                                    "runs": [{"label": "dp", **({"set": settings} if settings else {})}]}))
    return str(path)


def _json(path):
    return json.loads(path.read_text())


@pytest.fixture
def bars(monkeypatch):
    """Every sweep's progress bar, counting into a buffer."""
    made, real = [], sweep_module.sweep_progress

    @contextmanager
    def progress(total, quiet, file=None):
        with real(total, False, io.StringIO()) as bar:
            made.append(bar)
            yield bar

    monkeypatch.setattr(sweep_module, "sweep_progress", progress)
    return made


def _crash_after(monkeypatch, last: int):
    real = orchestrate.save_checkpoint

    def crash(run, rnd, *args):
        path = real(run, rnd, *args)
        if rnd == last:
            raise RuntimeError("the machine went away")
        return path

    monkeypatch.setattr(orchestrate, "save_checkpoint", crash)
    return lambda: monkeypatch.setattr(orchestrate, "save_checkpoint", real)


def test_an_interrupted_sweep_continues_its_run_and_audits_a_trained_one(tmp_path, monkeypatch, capsys, bars):
    assert main(["sweep", _sweep(tmp_path, "whole"), "--quiet"]) == 0
    whole = tmp_path / "whole" / "dp-seed0"

    restore = _crash_after(monkeypatch, 0)
    sweep = _sweep(tmp_path, "broken")
    assert main(["sweep", sweep, "--quiet"]) == 1
    broken = tmp_path / "broken" / "dp-seed0"
    assert not (broken / "metrics.json").exists() and (broken / "checkpoints" / "latest.pt").is_file()
    restore()
    capsys.readouterr()

    assert main(["sweep", sweep, "--quiet"]) == 0
    assert "dp-seed0: continued from its checkpoint, trained and audited" in capsys.readouterr().out
    assert not list((tmp_path / "broken").glob("dp-seed0.replaced-*"))  # continued in place, not redone
    assert "resumed after round 0" in (broken / "run.log").read_text()
    a, b = _json(whole / "metrics.json"), _json(broken / "metrics.json")
    assert a["utility"] == b["utility"] and a["privacy"] == b["privacy"]
    assert a["resumed_after_round"] is None and b["resumed_after_round"] == 0  # its timing covers rounds 1-2
    assert _json(whole / "privacy_ledger.json") == _json(broken / "privacy_ledger.json")  # no round counted twice
    assert (broken / "audit.json").is_file() and not (broken / "checkpoints").exists()
    # rounds 1 and 2, metrics, then the audit: the bar expected exactly that (round 0 was done before)
    assert bars[-1].bar.n == bars[-1].bar.total == 3 + 1 + (1 * 3 + 3) - 1

    (broken / "audit.json").unlink()  # training complete, audit lost
    trained = (broken / "metrics.json").read_bytes()
    assert main(["sweep", sweep, "--quiet"]) == 0
    assert "dp-seed0: training found complete, audited" in capsys.readouterr().out
    assert (broken / "metrics.json").read_bytes() == trained and (broken / "audit.json").is_file()
    assert _json(broken / "audit.json")["mia"] == _json(whole / "audit.json")["mia"]  # the same audit
    assert bars[-1].bar.n == bars[-1].bar.total == 1 * 3 + 3  # the audit's steps only

    assert main(["sweep", sweep, "--quiet"]) == 0
    assert "dp-seed0: finished before, skipped" in capsys.readouterr().out
    assert bars[-1].bar.n == bars[-1].bar.total == 0


@pytest.mark.parametrize("why", ["edited entry", "other code", "unreadable checkpoint"])
def test_a_checkpoint_that_cannot_be_trusted_is_not_continued(why, tmp_path, monkeypatch, capsys):
    restore = _crash_after(monkeypatch, 0)
    assert main(["sweep", _sweep(tmp_path, "out"), "--quiet"]) == 1
    restore()
    run = tmp_path / "out" / "dp-seed0"
    checkpoint = run / "checkpoints" / "latest.pt"
    written = checkpoint.read_bytes()
    settings = {}
    if why == "edited entry":
        settings = {"training.lambda_kl": 0.5}
    elif why == "other code":
        monkeypatch.setattr(sweep_module, "code_identity", lambda: {"version": "0.0", "git": None})
    else:
        checkpoint.write_bytes(written[:100])
    capsys.readouterr()
    assert main(["sweep", _sweep(tmp_path, "out", **settings), "--quiet"]) == 0
    assert "dp-seed0: trained and audited" in capsys.readouterr().out
    kept = tmp_path / "out" / "dp-seed0.replaced-1" / "checkpoints" / "latest.pt"
    assert kept.read_bytes() == (written[:100] if why == "unreadable checkpoint" else written)  # kept aside
    assert "resumed" not in (run / "run.log").read_text()
