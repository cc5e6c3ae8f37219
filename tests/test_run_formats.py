"""A run directory written before the run directory carried format versions still audits and
reports; a run from a newer format is refused with one line that says why."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from alignfl_audit.cli import main
from federation import run_layout as layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RUN_V1 = Path(__file__).with_name("data") / "run-v1"
SMALL_AUDIT = ["--set", "audit.members_per_client=20", "--set", "audit.generated_samples=200", "--set",
               "audit.bootstrap=20", "--set", "audit.inliers=10", "--set", "audit.lipschitz_prior_points=16",
               "--set", "audit.lipschitz_ascent_steps=2", "--set", "audit.latent_fit_steps=5", "--set",
               "audit.reference_epochs=1"]


@pytest.fixture
def old_run(tmp_path) -> Path:
    run = tmp_path / "run-v1"
    shutil.copytree(RUN_V1, run)
    return run


def test_the_recorded_run_really_is_of_the_earlier_format(old_run):
    metrics = json.loads((old_run / layout.METRICS).read_text())
    assert "format" not in metrics and "run_format" not in metrics
    assert layout.run_format(metrics) == layout.LEGACY_RUN_FORMAT != layout.RUN_FORMAT
    assert "format" not in json.loads((old_run / layout.LEDGER).read_text())


def test_a_run_written_before_format_versions_audits_and_reports(old_run, tmp_path):
    shared_before = {p: p.read_bytes() for p in (old_run / "shared").rglob("*") if p.is_file()}
    assert main(["audit", str(old_run), "--quiet", *SMALL_AUDIT]) == 0
    audit = json.loads((old_run / layout.AUDIT).read_text())
    assert audit["mia"] and audit["accountant"]["formal_guarantee"] is True and audit["accountant"]["epsilon"] > 0
    assert main(["report", str(old_run), "-o", str(tmp_path / "report.html")]) == 0
    html = (tmp_path / "report.html").read_text()
    assert "run-v1" in html and "Summary verdict" in html
    assert {p: p.read_bytes() for p in (old_run / "shared").rglob("*") if p.is_file()} == shared_before


def test_a_run_of_a_newer_format_is_refused_in_one_line(old_run, capsys):
    metrics = json.loads((old_run / layout.METRICS).read_text())
    metrics["run_format"] = "alignfl-run/99"
    (old_run / layout.METRICS).write_text(json.dumps(metrics))
    assert main(["audit", str(old_run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "run format 'alignfl-run/99'" in err and "upgrade alignfl-audit" in err and err.count("\n") == 1
    assert not (old_run / layout.AUDIT).exists()
