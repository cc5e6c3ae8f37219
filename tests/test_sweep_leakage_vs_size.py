"""Leakage against client data size: the shipped sweep's every run is a valid config whose DP-SGD plans can be
met, and the comparison report draws the curves (one line per mechanism) exactly when the runs differ in size."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from alignfl_audit.config import load_config
from alignfl_audit.orchestrate import dp_plan
from alignfl_audit.sweep import _configs, load_sweep
from federation.training import TrainSettings
from reports.evidence import RunEvidence
from reports.render import render_report
from reports.size_curves import size_figure

SWEEP = Path(__file__).resolve().parents[1] / "configs" / "sweep-leakage-vs-size.yaml"
MNIST_SMALLEST_CLASS = 5421  # MNIST's training images of digit 5, its smallest class


def _grid():
    plan = load_sweep(SWEEP)
    return plan, _configs(plan, {})  # every run through the config schema; a bad one raises ConfigError


def test_every_run_of_the_shipped_sweep_is_valid_and_covers_the_grid():
    plan, configs = _grid()
    assert plan.seeds == [0, 1]
    cells = {}
    for tag, cfg in configs:
        p = cfg.privacy
        setting = {"none": None, "dp-sgd": p.target_epsilon, "lcd": p.lcd_lambda}[p.mechanism]
        if p.mechanism == "dp-sgd":
            assert p.delta == 1e-5 and p.formal_guarantee()
        cells.setdefault((cfg.partition.samples_per_class, p.mechanism, setting), []).append(cfg.seed)
    sizes = sorted({size for size, _, _ in cells})
    full = load_config(plan.base).partition.samples_per_class
    assert len(sizes) >= 4 and sizes[0] <= 30 and sizes[-1] == full == 6000
    mechanisms = {(m, s) for _, m, s in cells}
    assert mechanisms == {("none", None), ("dp-sgd", 1), ("dp-sgd", 10), ("lcd", 0.1), ("lcd", 1)}
    assert len(cells) == len(sizes) * len(mechanisms) and all(seeds == [0, 1] for seeds in cells.values())


def test_every_dp_sgd_plan_of_the_shipped_sweep_can_be_met():
    """The budget is planned before training: calibrate the noise and check adaptive clipping for the smallest
    client each run can have (2 classes; fewer records need more noise), as the run will."""
    _, configs = _grid()
    planned = set()
    for tag, cfg in configs:
        if not cfg.privacy.is_dp:
            continue
        per_class = min(cfg.partition.samples_per_class, MNIST_SMALLEST_CLASS - cfg.partition.holdout_per_class)
        key = (per_class, cfg.privacy.target_epsilon, cfg.privacy.unclipped_num_std)
        if key in planned:  # the other seed: the same plan
            continue
        planned.add(key)
        t = cfg.training
        plan = dp_plan(cfg, 1, 2 * per_class, TrainSettings(t.rounds, t.local_epochs, t.batch_size))
        assert plan.noise_multiplier < 2 * plan.unclipped_num_std, tag
    assert len(planned) == 10


# ---------------------------------------------------------------- the report's figure, on made-up runs
def _privacy(mechanism: str, setting) -> dict:
    if mechanism == "dp-sgd":
        head = {"epsilon": setting * 0.99, "relation": "replace-one", "client": "0",
                "add_remove_epsilon": setting * 0.6, "delta": 1e-5, "unaccounted_clients": []}
        return {"mechanism": "dp-sgd", "formal_guarantee": True, "delta": 1e-5, "target_epsilon": setting,
                "clients": {"0": {"headline": head}}, "headline": head}
    return {"mechanism": mechanism, "formal_guarantee": False, "note": "no formal DP guarantee"}


def _metrics(name, size, mechanism, setting, seed, probe) -> dict:
    return {"name": name, "strategy": "alignfl", "seed": seed, "shared_artifacts": ["decoder"],
            "utility": {"probe_accuracy": probe, "probe_f1": probe, "fid": 10.0, "tstr_accuracy": None},
            "privacy": _privacy(mechanism, setting),
            "partition": {"clients": [{"client": 0, "class_counts": {"0": size, "1": size}},
                                      {"client": 1, "class_counts": {"2": size, "3": size}}]}}


def _config_text(mechanism, setting) -> str:
    return yaml.safe_dump({"privacy": {"mechanism": mechanism,
                                       **({"lcd_lambda": setting} if mechanism == "lcd" else {})}})


def _summary(auc, canary_lb) -> dict:
    return {"best_attack": {"name": "latent_fit", "auc": auc, "auc_ci": [auc - 0.02, auc + 0.02],
                            "tpr_at_1pct_fpr": auc - 0.49, "tpr_at_1pct_fpr_ci": [0.0, auc - 0.4]},
            "chance_band": {"auc_half_width": 0.03, "n_members": 100, "n_nonmembers": 100},
            "canary": None if canary_lb is None else {"epsilon_lb": canary_lb, "epsilon_ceiling": 3.0},
            "estimate": {"epsilon": 0.0, "attack": None, "ceiling": None}}


MECHANISMS = [("none", None), ("dp-sgd", 1), ("lcd", 0.1)]


def _run(size, mechanism, setting, seed, audited=True) -> RunEvidence:
    auc = 0.5 + 100 / (size * (1 + seed)) * (0.1 if mechanism == "dp-sgd" else 1)
    audit = {"summary": _summary(auc, None if mechanism == "lcd" else auc)} if audited else None
    return RunEvidence(Path(f"{mechanism}-{size}-{seed}"), _metrics("sweep", size, mechanism, setting, seed, 0.9),
                       audit, None, None, _config_text(mechanism, setting), None)


def test_the_figure_has_one_line_per_mechanism_through_the_mean_over_seeds():
    runs = [_run(size, m, s, seed) for size in (25, 100, 400) for m, s in MECHANISMS for seed in (0, 1)]
    fig = size_figure(runs)
    auc, tpr, canary, utility = fig.axes
    lines = {line.get_label(): line for line in auc.lines if not line.get_label().startswith("_")}
    assert set(lines) == {"No DP (no formal guarantee)", "DP-SGD, target ε 1 (δ 1e-05)",
                          "LCD-VAE λ 0.1 (no formal guarantee)"}
    dp = lines["DP-SGD, target ε 1 (δ 1e-05)"]
    assert list(dp.get_xdata()) == [25, 100, 400] and auc.get_xscale() == "log"
    expected = [np.mean([r.audit["summary"]["best_attack"]["auc"] for r in runs
                         if r.metrics["privacy"]["mechanism"] == "dp-sgd" and r.metrics["partition"]["clients"][0]
                         ["class_counts"]["0"] == size]) for size in (25, 100, 400)]
    assert np.allclose(dp.get_ydata(), expected)
    assert len([c for c in utility.lines if not c.get_label().startswith("_")]) == 3
    # the canary panel: no point for the runs without canaries (LCD here), and the audits' ceiling
    labels = [line.get_label() for line in canary.lines]
    assert "LCD-VAE λ 0.1 (no formal guarantee)" not in labels and "the most this audit could have shown" in labels
    assert not any("ε" in label for label in labels if "no formal guarantee" in label)


def _write(run: RunEvidence, root: Path) -> Path:
    path = root / run.path
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps(run.metrics))
    (path / "config.resolved.yaml").write_text(run.config_text)
    return path


@pytest.mark.parametrize("sizes", [(25, 400), (400, 400)])
def test_the_report_draws_the_figure_only_when_the_runs_differ_in_size(tmp_path, sizes):
    """Two seeds of each mechanism, at two sizes or at one: not audited, so the report needs only metrics.json."""
    dirs = [_write(_run(size, m, s, seed, audited=False), tmp_path) for seed, size in enumerate(sizes)
            for m, s in MECHANISMS]
    html = render_report(dirs, tmp_path / "report.html").read_text()
    differ = sizes[0] != sizes[1]
    assert ("Leakage against client data size" in html) == differ
    assert ('alt="leakage against client data size"' in html) == differ
    assert html.count("<img") == 1 + differ  # the frontier, and the size figure only where the sizes differ
