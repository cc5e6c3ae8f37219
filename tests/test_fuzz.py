"""Fuzzing the two ways input enters: configs (random mutations of a valid one) and uploads (random
bytes, and random bytes behind a sidecar that passes the sha256 check). Each either works or fails
with a one-line error; never a traceback, a hang, or a run directory that looks complete but is not."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from alignfl_audit.cli import main
from conftest import tiny_config
from federation.errors import UploadRejected
from federation.messages import FORMAT, load_uplink

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = tiny_config(name="fuzz", partition={"samples_per_class": 12, "holdout_per_class": 4},
                   metrics={"probe_every_round": False, "fid_samples": 60, "probe_max_iter": 50})


def _leaves(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, prefix + (k,))
    else:
        yield prefix


LEAVES = sorted(_leaves(BASE))
VALUES = st.one_of(
    st.integers(-2, 4), st.sampled_from([0.0, -1.0, 0.5, 1e-3, 2.0, math.nan, math.inf, 1e308]),
    st.text(max_size=6), st.none(), st.booleans(),
    st.lists(st.integers(-1, 10), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(0, 2), max_size=2),
    st.sampled_from(["mlp", "conv", "alignfl", "fedavg", "centralized", "dp-sgd", "lcd", "fashion_mnist",
                     "dirichlet", "gmm"]))
MUTATION = st.tuples(st.sampled_from(["set", "delete", "add"]), st.sampled_from(LEAVES), VALUES)


def _mutate(config: dict, mutations) -> dict:
    config = copy.deepcopy(config)
    for kind, path, value in mutations:
        node = config
        for key in path[:-1]:
            node = node[key]
        if kind == "set":
            node[path[-1]] = value
        elif kind == "delete":
            node.pop(path[-1], None)
        else:
            node[f"unknown_{path[-1]}"] = value
    return config


FUZZ_EXAMPLES = int(os.environ.get("ALIGNFL_FUZZ_EXAMPLES", "25"))  # raise for a longer fuzzing session


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(MUTATION, min_size=1, max_size=3))
def test_mutated_configs_run_or_fail_with_one_line(tmp_path_factory, capsys, mutations):
    tmp = tmp_path_factory.mktemp("fuzz")
    cfg = tmp / "cfg.yaml"
    try:
        text = yaml.safe_dump(_mutate(BASE, mutations))
    except yaml.YAMLError:
        return
    cfg.write_text(text)
    out = tmp / "run"
    code = main(["run", str(cfg), "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code in (0, 2), captured.err
    status = json.loads((out / "status.json").read_text())["state"] if (out / "status.json").is_file() else None
    if code == 2:
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("alignfl-audit: error: "), captured.err
        assert status != "complete" and not (out / "metrics.json").exists()
    else:
        assert status == "complete" and (out / "metrics.json").is_file()


def _upload_pair(directory, blob: bytes, meta: dict):
    path = directory / "client-0.safetensors"
    path.write_bytes(blob)
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


SIDECAR = {"format": FORMAT, "direction": "uplink", "client": 0, "round": 0, "kind": "decoder",
           "spec": {"arch": "mlp", "latent_dim": 2, "hidden": [8]}, "num_samples": 5, "extra_artifacts": [],
           "report": {"status": "trained", "loss": None, "dp_events": []}}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=2048), honest_sha=st.booleans(),
       meta_change=st.dictionaries(st.sampled_from(sorted(SIDECAR)), VALUES, max_size=2))
def test_random_upload_bytes_are_rejected_cleanly(tmp_path_factory, blob, honest_sha, meta_change):
    directory = tmp_path_factory.mktemp("upload")
    meta = {**SIDECAR, **meta_change,
            "sha256": hashlib.sha256(blob).hexdigest() if honest_sha else "0" * 64, "bytes": len(blob)}
    path = _upload_pair(directory, blob, meta)
    with pytest.raises(UploadRejected):
        load_uplink(path)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.text(max_size=12), st.one_of(
    st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets"]),
                    st.one_of(st.sampled_from(["F32", "F64", "I64", "U8", "BOOL", "X"]),
                              st.lists(st.integers(-2, 70000), max_size=3))),
    st.text(max_size=4)), max_size=3), body=st.binary(max_size=256))
def test_crafted_safetensors_headers_are_rejected_cleanly(tmp_path_factory, header, body):
    """Well-formed framing (8-byte length + JSON header) with hostile header contents."""
    directory = tmp_path_factory.mktemp("crafted")
    head = json.dumps(header).encode()
    blob = len(head).to_bytes(8, "little") + head + body
    meta = {**SIDECAR, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    with pytest.raises(UploadRejected):
        load_uplink(_upload_pair(directory, blob, meta))
