"""The four-system protocol as one sweep: the shipped configs/paper-protocol.yaml names ALIGN-FL, DP-SGD
at epsilon 10, LCD-VAE at lambda 0.1 and FedAvg on paper-mnist; a sweep entry may name its own base
config; runs with the same recipe share reference decoders through the sweep's cache, each audit
recording where its references came from; one progress bar counts every step of every run."""
from __future__ import annotations

import io
import json
from contextlib import contextmanager

import pytest
import yaml

from alignfl_audit import sweep as sweep_module
from alignfl_audit.cli import main
from alignfl_audit.progress import run_steps
from alignfl_audit.sweep import _configs, load_sweep
from conftest import PROJECT_ROOT, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

AUDIT = {"members_per_client": 20, "latent_fit_steps": 5, "latent_fit_init": 64, "latent_fit_restarts": 2,
         "generated_samples": 200, "bootstrap": 10, "inliers": 10, "lipschitz_prior_points": 16,
         "lipschitz_ascent_steps": 2, "reference_epochs": 1, "lipschitz_rounds": 1}


def test_the_paper_protocol_is_the_four_systems_on_paper_mnist():
    plan = load_sweep(PROJECT_ROOT / "configs" / "paper-protocol.yaml")
    configs = dict(_configs(plan, {}))
    assert list(configs) == ["alignfl-seed0", "dp-sgd-eps10-seed0", "lcd-0.1-seed0", "fedavg-seed0"]
    systems = {tag: (c.strategy.name, c.privacy.mechanism) for tag, c in configs.items()}
    assert systems == {"alignfl-seed0": ("alignfl", "none"), "dp-sgd-eps10-seed0": ("alignfl", "dp-sgd"),
                       "lcd-0.1-seed0": ("alignfl", "lcd"), "fedavg-seed0": ("fedavg", "none")}
    assert configs["dp-sgd-eps10-seed0"].privacy.target_epsilon == 10
    assert configs["lcd-0.1-seed0"].privacy.lcd_lambda == 0.1
    for cfg in configs.values():  # paper scale, full data, every run audited
        assert cfg.training.rounds == 10 and cfg.partition.samples_per_class == 6000
        assert cfg.data.allow_embedded is False and cfg.audit.enabled
    assert plan.reference_cache == plan.out / "reference-cache"


def test_a_sweep_shares_references_across_bases_and_counts_every_step(tmp_path, monkeypatch):
    small = dict(audit=AUDIT, metrics={"probe_every_round": False},
                 partition={"client_classes": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], "samples_per_class": 12,
                            "holdout_per_class": 6})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_config(**small)))
    (tmp_path / "base-fedavg.yaml").write_text(yaml.safe_dump(tiny_config(**small, strategy={"name": "fedavg"})))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "mini", "base": "base.yaml", "out": str(tmp_path / "unused"),
                                    "runs": [{"label": "alignfl"}, {"label": "fedavg", "base": "base-fedavg.yaml"}]}))
    bars, real = [], sweep_module.sweep_progress

    @contextmanager
    def progress(total, quiet, file=None):
        with real(total, False, io.StringIO()) as bar:  # a bar that counts, written to a buffer
            bars.append(bar)
            yield bar

    monkeypatch.setattr(sweep_module, "sweep_progress", progress)
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--quiet", "--out", str(out), "--set", "training.lambda_kl=0.5"]) == 0
    first, second = (json.loads((out / f"{label}-seed0" / "audit.json").read_text())["reference_models"]
                     for label in ("alignfl", "fedavg"))
    assert all(r["source"] == "trained here" for r in first.values())
    assert all(r["source"] == "cache" and r["created_by"] == str(out / "alignfl-seed0") for r in second.values())
    assert {r["key"] for r in first.values()} == {r["key"] for r in second.values()}
    assert all(r["cache"] == str(out / "reference-cache") for r in second.values())
    cfg = yaml.safe_load((out / "fedavg-seed0" / "config.resolved.yaml").read_text())
    assert cfg["strategy"]["name"] == "fedavg" and cfg["training"]["lambda_kl"] == 0.5
    bar = bars[0].bar
    assert bar.total == bar.n == 2 * (1 + 1 + 2 * 2 + 3)  # per run: its round, metrics, audit steps
    assert "sweep" in bar.fp.getvalue() and "<" in bar.fp.getvalue()  # elapsed<remaining

    cfg = next(c for _, c in _configs(load_sweep(path), {}))
    assert run_steps(cfg) == 1 + 1 + 2 * 2 + 3


def test_sweep_entries_are_checked(tmp_path, capsys):
    for body in ("base: b.yaml\nreference_cache: 3\nruns: [{label: a}]\n",
                 "base: b.yaml\nruns: [{label: a, base: [x]}]\n"):
        path = tmp_path / "s.yaml"
        path.write_text(body)
        assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "reference_cache must be a folder path or false" in err[0]
    assert "runs[0].base must name a config file" in err[1]
