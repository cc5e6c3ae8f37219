"""What makes the audit cheaper must not change what it finds: reference decoders read from a cache
give the same scores as freshly trained ones and are recorded as cached; the Lipschitz bracket on a
subset of rounds gives those rounds' brackets unchanged and lists the rounds it skipped."""
from __future__ import annotations

import hashlib
import json

import pytest

from alignfl_audit.audit import bracketed_rounds
from alignfl_audit.cli import main
from alignfl_audit.config import from_dict
from alignfl_audit.orchestrate import run_experiment
from conftest import tiny_config
from federation.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TWO_CLIENTS = {"client_classes": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], "samples_per_class": 12,
               "holdout_per_class": 6}
AUDIT = {"members_per_client": 20, "latent_fit_steps": 5, "latent_fit_init": 64, "latent_fit_restarts": 2,
         "generated_samples": 200, "bootstrap": 10, "inliers": 10, "lipschitz_prior_points": 16,
         "lipschitz_ascent_steps": 2, "reference_epochs": 1}


def _audit(run, *extra) -> dict:
    assert main(["audit", str(run), "--quiet", *extra]) == 0
    return json.loads((run / "audit.json").read_text())


def test_cached_references_and_a_round_subset_change_no_result(tmp_path):
    cfg = from_dict(tiny_config(name="speed", audit=AUDIT, training={"rounds": 3}, partition=TWO_CLIENTS,
                                metrics={"probe_every_round": False}))
    run = run_experiment(cfg, out=tmp_path / "run", quiet=True).path
    cache = tmp_path / "refs"

    fresh = _audit(run, "--set", "audit.lipschitz_rounds=2")  # every reference trained here
    assert all(r == {"cache": None, "hit": False, "source": "trained here", "seconds": r["seconds"]}
               for r in fresh["reference_models"].values())
    assert all(set(b["rounds"]) == {"0", "2"} and b["rounds_not_bracketed"] == [1]
               for b in fresh["lipschitz"].values())

    stored = _audit(run, "--reference-cache", str(cache), "--set", "audit.lipschitz_rounds=1")
    assert not any(r["hit"] for r in stored["reference_models"].values())
    assert len(list(cache.glob("*.safetensors"))) == 2 and len(list(cache.glob("*.json"))) == 2
    for cid, bracket in stored["lipschitz"].items():  # the final round's bracket, unchanged
        assert bracket["rounds"] == {"2": fresh["lipschitz"][cid]["rounds"]["2"]}
        assert bracket["rounds_not_bracketed"] == [0, 1]
        assert (bracket["lower"], bracket["upper"]) == (fresh["lipschitz"][cid]["lower"], fresh["lipschitz"][cid]["upper"])

    key0 = stored["reference_models"]["0"]["key"]
    (cache / f"{key0}.safetensors").write_bytes(b"not a safetensors file")  # a damaged entry is never trusted
    cached = _audit(run, "--reference-cache", str(cache), "--set", "audit.lipschitz_rounds=1")
    origin = cached["reference_models"]
    assert origin["0"]["hit"] is False and "trained again" in origin["0"]["replaced_entry"]
    assert origin["0"]["source"] == "trained here"
    assert origin["1"]["hit"] is True and origin["1"]["source"] == "cache"
    assert origin["1"]["key"] == stored["reference_models"]["1"]["key"] and origin["1"]["created_by"] == str(run)
    # the cached references score exactly as the freshly trained ones did
    assert json.dumps(cached["mia"], sort_keys=True) == json.dumps(fresh["mia"], sort_keys=True)
    sidecar = json.loads((cache / f"{key0}.json").read_text())  # the damaged entry was replaced by a good one
    assert sidecar["sha256"] == hashlib.sha256((cache / f"{key0}.safetensors").read_bytes()).hexdigest()


def test_bracketed_rounds_are_evenly_spaced_with_the_first_and_last():
    assert bracketed_rounds([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], None) == list(range(10))
    assert bracketed_rounds([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 1) == [9]
    assert bracketed_rounds([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 2) == [0, 9]
    assert bracketed_rounds([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 4) == [0, 3, 6, 9]
    assert bracketed_rounds([2, 5, 7], 5) == [2, 5, 7]
    with pytest.raises(ConfigError, match="audit.lipschitz_rounds must be > 0"):
        from_dict(tiny_config(audit={"lipschitz_rounds": 0}))
