"""The command line on bad input: one clear line on stderr, a nonzero exit, and no run directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml

from conftest import PROJECT_ROOT, tiny_config

PREFIX = "alignfl-audit: error:"


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alignfl_audit.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=PROJECT_ROOT, env=dict(os.environ))


def _yaml(**overrides) -> str:
    return yaml.safe_dump(tiny_config(**overrides), sort_keys=False)


# name -> (config file text, extra CLI args, text the error line must contain)
BAD_INPUTS = {
    "unknown-dataset": (_yaml(data={"dataset": "cifar10"}), [], "unknown dataset 'cifar10'"),
    "unknown-architecture": (_yaml(model={"arch": "transformer"}), [], "unknown architecture 'transformer'"),
    "overlapping-classes": (_yaml(partition={"client_classes": [[0, 1], [1, 2]]}), [],
                            "class 1 is given to clients 0 and 1"),
    "class-out-of-range-10": (_yaml(partition={"client_classes": [[0, 10], [2]]}), [],
                              "class 10 is out of range"),
    "class-out-of-range-negative": (_yaml(partition={"client_classes": [[-1], [2]]}), [],
                                    "class -1 is out of range"),
    "more-clients-than-classes": (_yaml(partition={"client_classes": [[c] for c in range(10)] + [[0]]}), [],
                                  "more clients (11) than classes (10)"),
    "samples-per-client-zero": (_yaml(server={"samples_per_client": 0}), [],
                                "server.samples_per_client must be > 0"),
    "samples-per-client-negative": (_yaml(server={"samples_per_client": -5}), [],
                                    "server.samples_per_client must be > 0"),
    "latent-dim-zero": (_yaml(model={"latent_dim": 0}), [], "latent_dim must be a positive integer"),
    "latent-dim-string": (_yaml(model={"latent_dim": "two"}), [], "latent_dim must be a positive integer"),
    "missing-data-root": (_yaml(), ["--data-root", "/nonexistent"], "/nonexistent"),
    "malformed-yaml": ("name: [unclosed\n", [], "malformed YAML"),
    "unknown-key": (_yaml(nmae="typo"), [], "unknown key nmae"),
    "unknown-nested-key": (_yaml(training={"epochs": 3}), [], "unknown key epochs in training"),
    "missing-config-file": (None, [], "cannot read config"),
    "bad-set-override": (_yaml(), ["--set", "training.rounds"], "--set takes KEY=VALUE"),
}


# Every case runs the real CLI module in its own process. Each fresh interpreter spends seconds
# importing torch & co. before it can reject anything, so most cases are forked from one warmed
# interpreter (_cli_forkserver.py); these also run as plain `python -m alignfl_audit.cli` processes,
# and must give byte-identical results, which checks the fork server against the real thing.
LITERAL = ("unknown-dataset", "missing-data-root")


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory):
    """name -> (out dir, returncode, stdout, stderr) from the fork server, and the literal runs."""
    base = tmp_path_factory.mktemp("cli-bad")
    argvs, cases = {}, []
    for name, (text, extra, _) in BAD_INPUTS.items():
        cfg = base / f"{name}.yaml"
        if text is not None:
            cfg.write_text(text)
        out = base / f"{name}-out"
        argvs[name] = (out, ["run", str(cfg), "--out", str(out), "--quiet", *extra])
        cases.append({"argv": argvs[name][1], "stdout": str(base / f"{name}.stdout"),
                      "stderr": str(base / f"{name}.stderr")})
    spec = base / "cases.json"
    spec.write_text(json.dumps(cases))
    helper = Path(__file__).with_name("_cli_forkserver.py")
    server = subprocess.Popen([sys.executable, str(helper), str(spec)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=PROJECT_ROOT, env=dict(os.environ))
    with ThreadPoolExecutor(max_workers=len(LITERAL)) as pool:
        literal = dict(zip(LITERAL, pool.map(lambda n: cli(*argvs[n][1]), LITERAL)))
    stdout, stderr = server.communicate(timeout=300)
    assert server.returncode == 0, stderr
    codes = json.loads(stdout)
    forked = {name: (argvs[name][0], code, (base / f"{name}.stdout").read_text(),
                     (base / f"{name}.stderr").read_text()) for name, code in zip(BAD_INPUTS, codes)}
    literal = {name: (argvs[name][0], p.returncode, p.stdout, p.stderr) for name, p in literal.items()}
    return forked, literal


def _check_one_line_error(result, name):
    out, code, stdout, stderr = result
    lines = stderr.strip().splitlines()
    assert code != 0, (code, stderr)
    assert "Traceback" not in stderr + stdout
    assert len(lines) == 1, stderr
    assert lines[0].startswith(PREFIX), lines[0]
    assert BAD_INPUTS[name][2] in lines[0], lines[0]
    assert not out.exists(), f"{name} left a run directory behind"
    assert stdout == ""


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_fails_with_one_line_and_no_run_dir(bad_input_results, name):
    forked, _ = bad_input_results
    _check_one_line_error(forked[name], name)


@pytest.mark.parametrize("name", LITERAL)
def test_bad_input_as_a_plain_subprocess(bad_input_results, name):
    forked, literal = bad_input_results
    _check_one_line_error(literal[name], name)
    assert literal[name][1:] == forked[name][1:]  # the fork server behaves like `python -m`


def test_existing_output_directory_is_never_reused(tmp_path, capsys, monkeypatch):
    from alignfl_audit.cli import main

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(_yaml())
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(PREFIX) and "already exists" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


FLAGS = ("--data-root", "--out", "--seed", "--quiet")


def test_run_help_documents_the_flags():
    proc = cli("run", "--help", timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    for flag in FLAGS:
        assert flag in proc.stdout, flag
    assert "ALIGNFL_DATA_DIR" in proc.stdout


def test_top_level_help_exits_zero():
    proc = cli("--help", timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "usage: alignfl-audit" in proc.stdout and "run" in proc.stdout


def test_top_level_help_mentions_run_flags():
    proc = cli("--help", timeout=60)
    assert proc.returncode == 0
    for flag in FLAGS:
        assert flag in proc.stdout, flag


def test_no_command_is_a_usage_error():
    proc = cli(timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "usage: alignfl-audit" in proc.stderr


def test_console_script_points_at_main():
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts.get("alignfl-audit") == "alignfl_audit.cli:main"


# ------------------------------------------------------------------------------- inspect-upload
def _inspect(capsys, *args):
    from alignfl_audit.cli import main

    code = main(["inspect-upload", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _client(client_id: int, rnd: int):
    from federation.client import Client, ClientSetup
    from federation.privacy.spec import PrivacySpec
    from federation.training import TrainSettings

    setup = ClientSetup(client_id, torch.rand(10, 1, 28, 28), {"arch": "mlp", "latent_dim": 2, "hidden": [16, 8]},
                        TrainSettings(rounds=1, local_epochs=1, batch_size=5), 0, PrivacySpec())
    return Client(setup, None, rnd)


def _uplink(client, payload):
    from federation.messages import ClientReport, Uplink

    return Uplink(client.id, client.round, payload, client.setup.num_samples, ClientReport("trained", 1.5))


def test_inspect_upload_shows_a_decoder_upload_and_confirms_no_encoder(tmp_path, capsys):
    from federation.messages import write_message

    client = _client(2, 3)
    path = write_message(_uplink(client, client.decoder_payload()), tmp_path)
    code, out, err = _inspect(capsys, path)
    assert code == 0, err
    assert "valid decoder uplink from client 2, round 3" in out
    assert "report: trained, loss 1.5, 0 DP event(s)" in out
    assert "encoder present: no" in out
    n_params = sum(p.numel() for p in client.vae.decoder.parameters())
    assert f"{n_params} parameters" in out
    for name in client.vae.decoder.state_dict():
        assert name in out
    code, out, _ = _inspect(capsys, path, "--json")
    info = json.loads(out)
    assert code == 0 and info["encoder_present"] is False and info["parameters"] == n_params
    assert [t["name"] for t in info["tensors"]] == list(client.vae.decoder.state_dict())

    full = write_message(_uplink(client, client.vae_payload()), tmp_path / "fedavg")
    code, out, _ = _inspect(capsys, full)
    assert code == 0 and "encoder present: YES" in out


def test_inspect_upload_shows_a_downlink_and_its_recipients(tmp_path, capsys):
    from federation.messages import Downlink, write_message

    client = _client(0, 1)
    path = write_message(Downlink(1, (0, 2), client.vae_payload()), tmp_path)
    assert path.name == "server-to-clients.safetensors"
    code, out, err = _inspect(capsys, path)
    assert code == 0, err
    assert "valid vae downlink from the server to client(s) 0, 2, round 1" in out
    assert "encoder present: YES" in out
    single = write_message(Downlink(1, (2,), client.vae_payload()), tmp_path / "one")
    assert single.name == "server-to-client-2.safetensors"
    code, out, _ = _inspect(capsys, single, "--json")
    assert code == 0 and json.loads(out)["recipients"] == [2]


def test_inspect_upload_rejects_an_invalid_upload_in_one_line(tmp_path, capsys):
    from federation.messages import write_message

    client = _client(0, 0)
    path = write_message(_uplink(client, client.decoder_payload()), tmp_path)
    path.write_bytes(b"\x80\x04not a safetensors file")
    code, out, err = _inspect(capsys, path)
    assert code != 0 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alignfl-audit: error:") and "sha256" in lines[0]
