"""The ``privacy:`` section on bad input: every impossible value is a ``ConfigError`` with a one-line
message naming the key, raised before any run directory exists; through the CLI that is one
``alignfl-audit: error:`` line on stderr and a nonzero exit. Also the ``epsilon`` subcommand."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignfl_audit.accounting import ACCOUNTANTS, epsilons
from alignfl_audit.config import from_dict
from conftest import tiny_config
from federation.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PREFIX = "alignfl-audit: error:"

BASE = tiny_config(
    name="privacy-config",
    partition={"client_classes": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]},
    model={"hidden": [16, 8]},
    training={"batch_size": 32},
    server={"samples_per_client": 50},
    metrics={"fid_samples": 100, "probe_every_round": False},
    privacy={"mechanism": "dp-sgd", "target_epsilon": 4.0, "delta": 1e-5},
)
# quickstart's partition: 250 records per class, two classes per client (+25 outliers on client 0)
QUICKSTART_PARTITION = {"client_classes": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], "samples_per_class": 250,
                        "holdout_per_class": 50, "outliers": {"count": 25, "client": 0, "holdout": 50}}


def config(privacy: dict | None = None, replace_privacy: bool = False, **sections) -> dict:
    cfg = copy.deepcopy(BASE)
    if privacy is not None:
        cfg["privacy"] = dict(privacy) if replace_privacy else {**cfg["privacy"], **privacy}
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


DP = {"mechanism": "dp-sgd"}
BAD = {
    # name: (privacy section (merged over BASE's), expected text of the one-line message)
    "epsilon-zero": ({"target_epsilon": 0}, "privacy.target_epsilon must be > 0, got 0"),
    "epsilon-negative": ({"target_epsilon": -1.5}, "privacy.target_epsilon must be > 0, got -1.5"),
    "delta-zero": ({"delta": 0}, "privacy.delta must be in (0, 1/n), got 0"),
    "delta-one": ({"delta": 1}, "privacy.delta must be in (0, 1/n), got 1"),
    "delta-negative": ({"delta": -1e-5}, "privacy.delta must be in (0, 1/n)"),
    "delta-above-one": ({"delta": 2.0}, "privacy.delta must be in (0, 1/n)"),
    "clip-zero": ({"max_grad_norm": 0}, "privacy.max_grad_norm (the clip bound) must be > 0, got 0"),
    "clip-negative": ({"max_grad_norm": -1, "clipping": "fixed"}, "privacy.max_grad_norm (the clip bound) must be > 0"),
    "sigma-negative": ({"target_epsilon": None, "noise_multiplier": -1},
                       "privacy.noise_multiplier must be > 0 (0 adds no noise: use mechanism none), got -1"),
    "quantile-zero": ({"target_quantile": 0}, "privacy.target_quantile must be in (0, 1), got 0"),
    "quantile-one": ({"target_quantile": 1}, "privacy.target_quantile must be in (0, 1), got 1"),
    "quantile-1.5": ({"target_quantile": 1.5}, "privacy.target_quantile must be in (0, 1), got 1.5"),
    "clipbound-lr-zero": ({"clipbound_lr": 0}, "privacy.clipbound_lr must be > 0"),
    "min-above-max": ({"min_clipbound": 10, "max_clipbound": 1}, "privacy.min_clipbound must be > 0 and below"),
    "min-zero": ({"min_clipbound": 0}, "privacy.min_clipbound must be > 0"),
    "count-std-zero": ({"unclipped_num_std": 0}, "privacy.unclipped_num_std must be > 0"),
    "lcd-lambda-negative": ({"mechanism": "lcd", "target_epsilon": None, "lcd_lambda": -1},
                            "privacy.lcd_lambda must be >= 0, got -1"),
    "lcd-spectral-lambda-negative": ({"mechanism": "lcd-spectral", "target_epsilon": None, "lcd_lambda": -0.5},
                                     "privacy.lcd_lambda must be >= 0"),
    "both-epsilon-and-sigma": ({"noise_multiplier": 1.0}, "exactly one of privacy.target_epsilon and "
                                                         "privacy.noise_multiplier"),
    "neither-epsilon-nor-sigma": ({"target_epsilon": None}, "exactly one of privacy.target_epsilon"),
    "unknown-mechanism": ({"mechanism": "dp-adam"}, "privacy.mechanism must be one of"),
    "unknown-clipping": ({"clipping": "auto"}, "privacy.clipping must be one of"),
    "unknown-scope": ({"scope": "encoder"}, "privacy.scope must be one of"),
    "unknown-grad-mode": ({"grad_sample_mode": "jit"}, "privacy.grad_sample_mode must be one of"),
    "unknown-calibration": ({"calibration_accountant": "prv"}, "privacy.calibration_accountant must be pld or rdp"),
    "delta-not-a-number": ({"delta": "tiny"}, "privacy.delta must be a number, got 'tiny'"),
    "epsilon-bool": ({"target_epsilon": True}, "privacy.target_epsilon must be a number"),
    "unknown-privacy-key": ({"epsilon": 3.0}, "unknown key epsilon in privacy"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_privacy_values_are_one_line_config_errors(name):
    privacy, text = BAD[name]
    with pytest.raises(ConfigError) as info:
        from_dict(config(privacy))
    msg = str(info.value)
    assert "\n" not in msg
    assert text in msg, msg


def test_yaml_scientific_notation_is_a_number():
    cfg = from_dict(config({"delta": "1e-5"}))  # YAML 1.1 reads 1e-5 as a string
    assert cfg.privacy.delta == 1e-5


def test_zero_noise_is_refused_for_dp_sgd():
    with pytest.raises(ConfigError, match="0 adds no noise"):
        from_dict(config({"target_epsilon": None, "noise_multiplier": 0.0}))


def test_dp_with_parameter_averaging_is_refused():
    with pytest.raises(ConfigError, match="fedavg"):
        from_dict(config(strategy={"name": "fedavg"}))


def test_good_privacy_sections_validate():
    for privacy in ({"mechanism": "none"}, {"mechanism": "lcd", "lcd_lambda": 0.0},
                    {"mechanism": "lcd-spectral"}, {"mechanism": "dp-sgd", "noise_multiplier": 0.5},
                    {"mechanism": "dp-sgd", "target_epsilon": 2.0, "clipping": "median-nonprivate"},
                    {"mechanism": "dp-sgd", "target_epsilon": 2.0, "scope": "decoder", "grad_sample_mode": "hooks"}):
        from_dict(config(privacy, replace_privacy=True))
    # the guarantee label follows the mechanism
    assert from_dict(config()).privacy.formal_guarantee() is True
    for privacy in ({"clipping": "median-nonprivate"}, {"scope": "decoder"}):
        spec = from_dict(config(privacy)).privacy
        assert spec.formal_guarantee() is False and "no formal DP guarantee" in spec.guarantee_note()
    spectral = from_dict(config({"mechanism": "lcd-spectral"}, replace_privacy=True))
    assert all(s["spectral_norm"] is True for s in spectral.client_specs())


# ------------------------------------------------------------------ checks that need the data (n per client)
RUNTIME_BAD = {
    # delta >= 1/n: client 0 holds 2 * 250 + 25 outliers = 525 records, 1/525 = 0.0019 < 0.01
    "delta-above-1-over-n": (config({"delta": 0.01}, partition=QUICKSTART_PARTITION),
                             ["privacy.delta=0.01 must be below 1/n = 1/525", "client 0"]),
    # Opacus's adaptive clipping needs sigma < 2 * unclipped_num_std (Andrew et al., Thm 1)
    "adaptive-sigma-too-large": (config({"target_epsilon": None, "noise_multiplier": 5, "unclipped_num_std": 2}),
                                 ["adaptive clipping needs noise multiplier < 2 * unclipped_num_std",
                                  "sigma=5 >= 2 * 2"]),
    # the default unclipped_num_std is the expected batch size / 20 = 32 / 20 = 1.6
    "adaptive-default-std": (config({"target_epsilon": None, "noise_multiplier": 3.5}), ["sigma=3.5 >= 2 * 1.6"]),
}


@pytest.mark.parametrize("name", list(RUNTIME_BAD))
def test_run_time_privacy_checks_refuse_before_the_run_directory(name, tmp_path):
    from alignfl_audit.orchestrate import run_experiment

    data, texts = RUNTIME_BAD[name]
    cfg = from_dict(data)  # passes the static checks ...
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as info:  # ... and is refused once n is known, before training
        run_experiment(cfg, out=out, quiet=True)
    msg = str(info.value)
    assert "\n" not in msg
    for text in texts:
        assert text in msg, msg
    assert not out.exists()


# ------------------------------------------------------------------ the command line
# Each `python -m alignfl_audit.cli` process spends several seconds importing torch before it can
# reject anything, so four cases run as real processes (started when this module starts, so they
# overlap with the in-process tests above and below) and the rest through ``cli.main`` in-process.
def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "alignfl_audit.cli", *args]


CLI_RUN_BAD = {
    "epsilon-zero": (config({"target_epsilon": 0}), "privacy.target_epsilon must be > 0"),
    "sigma-negative": (config({"target_epsilon": None, "noise_multiplier": -1}),
                       "privacy.noise_multiplier must be > 0"),
    "delta-above-1-over-n": (RUNTIME_BAD["delta-above-1-over-n"][0], "must be below 1/n = 1/525"),
    # in-process through cli.main
    "quantile-1.5": (config({"target_quantile": 1.5}), "privacy.target_quantile must be in (0, 1)"),
    "lcd-lambda-negative": (config({"mechanism": "lcd", "lcd_lambda": -1}, replace_privacy=True),
                            "privacy.lcd_lambda must be >= 0"),
    "adaptive-sigma-too-large": (RUNTIME_BAD["adaptive-sigma-too-large"][0], "sigma=5 >= 2 * 2"),
    "delta-zero": (config({"delta": 0}), "privacy.delta must be in (0, 1/n)"),
    "clip-zero": (config({"max_grad_norm": 0}), "privacy.max_grad_norm (the clip bound) must be > 0"),
}
LITERAL = ("epsilon-zero", "sigma-negative", "delta-above-1-over-n", "eps-json")


@pytest.fixture(scope="module")
def cli_cases(tmp_path_factory):
    """name -> (argv after the program name, run dir or None)."""
    base = tmp_path_factory.mktemp("privacy-cli")
    cases = {}
    for name, (data, _) in CLI_RUN_BAD.items():
        path = base / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        out = base / f"{name}-out"
        cases[name] = (["run", str(path), "--out", str(out), "--quiet"], out)
    empty = base / "not-a-run"
    empty.mkdir()
    cases["eps-json"] = (["epsilon", "--sampling-rate", "0.01", "--noise-multiplier", "1", "--steps", "1000",
                          "--delta", "1e-5", "--json"], None)
    cases["eps-no-ledger"] = (["epsilon", "--ledger", str(empty)], None)
    cases["eps-missing-args"] = (["epsilon", "--sampling-rate", "0.01"], None)
    return cases


@pytest.fixture(scope="module", autouse=True)
def literal_processes(cli_cases):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen(cli_argv(*cli_cases[name][0]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, cwd=PROJECT_ROOT, env=env) for name in LITERAL}
    results: dict = {}

    def get(name: str) -> tuple[int, str, str]:
        if name not in results:
            out, err = procs[name].communicate(timeout=300)
            results[name] = (procs[name].returncode, out, err)
        return results[name]

    yield get
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_cli(name, cli_cases, literal_processes, capsys) -> tuple[int, str, str]:
    if name in LITERAL:
        return literal_processes(name)
    from alignfl_audit.cli import main

    capsys.readouterr()
    code = main(cli_cases[name][0])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, out: str, err: str, text: str) -> None:
    assert code != 0
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX), lines[0]
    assert text in lines[0], lines[0]


@pytest.mark.parametrize("name", list(CLI_RUN_BAD))
def test_cli_refuses_bad_privacy_with_one_line_and_no_run_directory(name, cli_cases, literal_processes, capsys):
    assert_one_error_line(*run_cli(name, cli_cases, literal_processes, capsys), CLI_RUN_BAD[name][1])
    assert not cli_cases[name][1].exists()


def test_cli_epsilon_json_reports_four_accountants_and_a_headline(cli_cases, literal_processes, capsys):
    code, out, err = run_cli("eps-json", cli_cases, literal_processes, capsys)
    assert code == 0, err
    both = json.loads(out)
    result = both["relations"]["add-remove"]
    assert set(result["accountants"]) == set(ACCOUNTANTS)
    for name, r in result["accountants"].items():
        assert r["error"] is None and r["epsilon"] > 0, name
    assert result["headline"]["accountant"] in ACCOUNTANTS
    assert result["headline"]["epsilon"] == min(r["epsilon"] for r in result["accountants"].values())
    assert result["flags"] == []
    # the same numbers as the library computes
    direct = epsilons([(1.0, 0.01, 1000)], 1e-5)
    for name in ACCOUNTANTS:
        assert result["accountants"][name]["epsilon"] == pytest.approx(direct["accountants"][name]["epsilon"],
                                                                       rel=1e-9)
    # and the headline is replace-one's, named as such, with the reason
    replace_one = both["relations"]["replace-one"]
    assert both["headline"] == {"relation": "replace-one", **replace_one["headline"]}
    assert replace_one["flags"] == [] and "record count" in both["relation_reason"]


def test_cli_epsilon_ledger_on_a_directory_without_one_fails_with_one_line(cli_cases, literal_processes, capsys):
    code, out, err = run_cli("eps-no-ledger", cli_cases, literal_processes, capsys)
    assert_one_error_line(code, out, err, "cannot read a privacy ledger")
    assert "privacy_ledger.json" in err


def test_cli_epsilon_without_enough_arguments_fails_with_one_line(cli_cases, literal_processes, capsys):
    assert_one_error_line(*run_cli("eps-missing-args", cli_cases, literal_processes, capsys), "--noise-multiplier")
