"""Reports: one command from config to a self-contained report.html; escaping; missing sections;
exports; sweeps; and a real headless-Chromium check of the rendered page."""
from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest
import yaml
from markupsafe import escape

from _chromium import chromium_binary, inspect_page
from alignfl_audit.cli import main
from alignfl_audit.config import from_dict
from alignfl_audit.orchestrate import run_experiment, run_pipeline
from conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

AUDIT = {"enabled": True, "members_per_client": 20, "latent_fit_steps": 10, "latent_fit_init": 128,
         "latent_fit_restarts": 1, "generated_samples": 300, "bootstrap": 20, "inliers": 10,
         "lipschitz_prior_points": 16, "lipschitz_ascent_steps": 2, "reference_epochs": 1}
HOSTILE = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """The one-call path: train, audit and report, with a hostile run name and figures on."""
    cfg = from_dict(tiny_config(name=HOSTILE, audit=AUDIT, report=True,
                                metrics={"figures": True},
                                partition={"outliers": {"count": 8, "client": 0, "holdout": 8},
                                           "canaries": {"count": 20, "client": 1}}))
    return run_pipeline(cfg, out=tmp_path_factory.mktemp("pipeline") / "run", quiet=True).path


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    cfg = from_dict(tiny_config(name="dp-run", privacy={"mechanism": "dp-sgd", "target_epsilon": 4.0,
                                                        "delta": 1e-5, "clipping": "fixed"}))
    return run_experiment(cfg, out=tmp_path_factory.mktemp("dp") / "run", quiet=True).path


def test_one_call_writes_run_audit_report_and_exports(pipeline_run):
    for name in ("metrics.json", "audit.json", "report.html", "report.metrics.csv", "report.metrics.json",
                 "run.log"):
        assert (pipeline_run / name).is_file(), name
    log = (pipeline_run / "run.log").read_text()
    assert "round 0:" in log and "audit written" in log and "report written" in log
    df = pd.read_csv(pipeline_run / "report.metrics.csv")
    assert list(df.columns) == ["run", "run_dir", "section", "metric", "client", "value"]
    metrics = json.loads((pipeline_run / "metrics.json").read_text())
    probe = df[(df.section == "utility") & (df.metric == "probe_accuracy")]["value"]
    assert float(probe.iloc[0]) == pytest.approx(metrics["utility"]["probe_accuracy"])
    audit = json.loads((pipeline_run / "audit.json").read_text())
    auc = df[(df.section == "mia") & (df.metric == "white_box_latent_fit.auc")]["value"]
    assert float(auc.iloc[0]) == pytest.approx(audit["mia"]["white_box_latent_fit"]["auc"])
    assert json.loads((pipeline_run / "report.metrics.json").read_text())[0]["run"].startswith(HOSTILE)


def test_report_is_self_contained_and_escapes_strings(pipeline_run):
    html = (pipeline_run / "report.html").read_text()
    assert HOSTILE not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", html, re.I)
    assert not re.search(r"@import|url\(", html)
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert len(srcs) >= 8 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for section in ("summary-table", "Privacy-utility frontier", "Membership inference", "Outlier reconstruction",
                    "Lipschitz bracket", "Privacy ledger", "Provenance", "Methods and limitations",
                    "domain-CNN FID", "no formal DP guarantee"):
        assert section in html, section


def test_missing_sections_are_explained_and_no_epsilon_without_a_guarantee(pipeline_run, dp_run, tmp_path):
    out = tmp_path / "both.html"
    assert main(["report", str(pipeline_run), str(dp_run), "-o", str(out)]) == 0
    html = out.read_text()
    rows = re.search(r'<tbody>(.*?)</tbody>', html, re.S).group(1).split("<tr>")[1:]
    assert len(rows) == 2
    no_dp, dp = rows
    assert "No formal guarantee, so no &epsilon;" in no_dp and "client 0:" not in no_dp.split("</td>")[3]
    ledger = json.loads((dp_run / "metrics.json").read_text())["privacy"]
    eps = max(c["headline"]["epsilon"] for c in ledger["clients"].values())
    assert f"{eps:.3f}" in dp and "Not audited" in dp  # the DP run was not audited: said so, no crash
    assert "No DP events were recorded" in html  # the no-DP run's ledger section
    assert "This run has no audit.json" in html


def test_report_errors_are_one_line(tmp_path, capsys, pipeline_run):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    for broken in ("{}", "[1, 2]", '{"format": "alignfl-audit/1", "mia": {}}', "not json"):
        copy = tmp_path / f"copy-{len(broken)}"
        shutil.copytree(pipeline_run, copy)
        (copy / "report.html").write_text("earlier report")
        (copy / "audit.json").write_text(broken)
        assert main(["report", str(copy)]) == 2
        assert (copy / "report.html").read_text() == "earlier report"  # a failed render loses nothing
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("alignfl-audit: error: ") for line in err)
    assert "is not a finished run" in err[0] and all("audit.json" in line for line in err[1:])


def _summary_row(html: str) -> str:
    return re.search(r'<tbody>(.*?)</tbody>', html, re.S).group(1)


def test_both_outlier_verdicts_are_shown_as_the_audit_wrote_them(pipeline_run, tmp_path):
    audit = json.loads((pipeline_run / "audit.json").read_text())
    o = audit["outliers"]
    html = (pipeline_run / "report.html").read_text()
    row = _summary_row(html)
    assert f"memorisation: <b>{o['memorisation']['verdict']}</b>" in row
    assert f"mapped to typical: <b>{o['typical_mapping']['verdict']}</b>" in row
    assert f"<b>{o['memorisation']['verdict']}</b>: {escape(o['memorisation']['reason'])}." in html
    assert (f"<b>The paper's claim, outliers are mapped to typical points</b>: "
            f"<b>{o['typical_mapping']['verdict']}</b>: {escape(o['typical_mapping']['reason'])}.") in html
    for name in ("outliers", "controls", "inliers"):  # the distance distribution, not only a rate
        q = o["normalized_distance_percentiles"][name]
        assert f"{q['p05']:.3f} / {q['p25']:.3f} / {q['median']:.3f}" in html
    assert "class-matched: in every class as many non-members as members" in html
    # "cannot judge" is shown as such: the same run with every inlier reconstruction unrecognised
    copy = tmp_path / "run"
    shutil.copytree(pipeline_run, copy)
    from attacks.outlier_verdicts import typical_mapping_verdict
    o["typical_mapping"] = typical_mapping_verdict(o["typical_mapping"]["outliers_mapped_to_typical"],
                                                   o["groups"]["outliers"]["n"], 0.0, o["groups"]["inliers"]["n"])
    (copy / "audit.json").write_text(json.dumps(audit))
    assert main(["report", str(copy), "-o", str(tmp_path / "report.html")]) == 0
    html = (tmp_path / "report.html").read_text()
    assert "mapped to typical: <b>cannot judge</b>" in _summary_row(html)
    assert f"<b>cannot judge</b>: {escape(o['typical_mapping']['reason'])}." in html
    assert "maps only 0.000 of the decoder" in o["typical_mapping"]["reason"]


def test_what_the_audit_could_have_seen_is_stated_beside_every_bound(pipeline_run, tmp_path):
    audit = json.loads((pipeline_run / "audit.json").read_text())
    html = (pipeline_run / "report.html").read_text()
    s, c = audit["sensitivity"], audit["canaries"]
    g = s["membership_game"]
    assert (f"<b>What this audit could have seen:</b> a membership AUC outside 0.5 &plusmn; "
            f"{g['auc_half_width']:.3f} ({g['n_members']} members and {g['n_nonmembers']} non-members pooled, "
            "95%") in html
    assert f"a canary lower bound up to &epsilon; = {c['epsilon_ceiling']:.3f} (20 canaries, 8 guesses" in html
    assert f"a membership-game estimate up to &epsilon; = {s['membership_estimate_ceiling']:.3f}." in html
    row = _summary_row(html)
    assert f"&ge; {c['epsilon_lb']:.3f}" in row
    assert f"the most this audit could have shown: {c['epsilon_ceiling']:.3f}" in row
    assert f"the most this audit could have shown: {audit['empirical_epsilon_ceiling']:.3f}" in row
    assert f"chance band 0.5 &plusmn; {g['auc_half_width']:.3f}" in row
    assert (f"the most this audit could have shown (all 8 guesses right): {c['epsilon_ceiling']:.3f}") in html
    for res in audit["empirical_epsilon_detail"]["per_attack"].values():
        assert f"{res['epsilon_lb']:.3f} ({res['epsilon_ceiling']:.3f})" in html
    # an audit without canaries says that no proven bound was possible
    copy = tmp_path / "run"
    shutil.copytree(pipeline_run, copy)
    from alignfl_audit.audit_summary import audit_summary
    from attacks.sensitivity import audit_sensitivity
    audit.update(canaries=None, empirical_epsilon_proven=None, empirical_epsilon_proven_ceiling=None,
                 sensitivity=audit_sensitivity(audit["mia"], audit["empirical_epsilon_detail"], None, 0.05))
    audit["summary"] = audit_summary(audit)  # as the audit of a run without canaries writes it
    (copy / "audit.json").write_text(json.dumps(audit))
    assert main(["report", str(copy), "-o", str(tmp_path / "none.html")]) == 0
    html = (tmp_path / "none.html").read_text()
    assert "no proven bound: no canaries were inserted (partition.canaries.count: 0)" in html
    assert "no canaries: no proven bound" in _summary_row(html)
    # an audit written before sensitivity was recorded renders and says so
    for key in ("sensitivity", "empirical_epsilon_ceiling", "empirical_epsilon_proven_ceiling"):
        del audit[key]
    for res in audit["empirical_epsilon_detail"]["per_attack"].values():
        del res["epsilon_ceiling"]
    del audit["summary"]  # nor a summary: it is computed on reading
    audit["format"] = "alignfl-audit/2"
    (copy / "audit.json").write_text(json.dumps(audit))
    assert main(["report", str(copy), "-o", str(tmp_path / "old.html")]) == 0
    html = (tmp_path / "old.html").read_text()
    assert "What this audit could have seen was not recorded: it was audited by an earlier version" in html
    assert "the most this audit could have shown" not in _summary_row(html)


def test_an_audit_with_the_earlier_single_verdict_is_rendered_and_said_to_be_old(pipeline_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(pipeline_run, copy)
    audit = json.loads((copy / "audit.json").read_text())
    o = audit["outliers"]
    for key in ("memorisation", "typical_mapping", "normalized_distance_percentiles", "reconstruction_threshold"):
        del o[key]
    del audit["membership_game"]
    o["verdict"] = "holds: outliers are reconstructed no more often than never-seen controls"
    (copy / "audit.json").write_text(json.dumps(audit))
    assert main(["report", str(copy), "-o", str(tmp_path / "report.html")]) == 0
    html = (tmp_path / "report.html").read_text()
    assert "audited by an earlier version (one verdict)" in _summary_row(html)
    assert "written by an earlier version, with one verdict that mixed memorisation" in html
    assert "not class-matched: audited by an earlier version" in html


def test_the_report_shows_the_audits_summary_and_picks_nothing_itself(pipeline_run, tmp_path):
    """The summary row and the frontier take the best attack and the bounds from audit.json's summary block; an
    audit written before the block existed gets it from the same function on reading."""
    from alignfl_audit.audit_summary import audit_summary

    audit = json.loads((pipeline_run / "audit.json").read_text())
    s = audit["summary"]
    assert s == audit_summary({k: v for k, v in audit.items() if k != "summary"})  # what the audit wrote
    best = max(audit["mia"], key=lambda name: audit["mia"][name]["auc"])
    assert s["best_attack"]["name"] == best and s["best_attack"]["auc"] == audit["mia"][best]["auc"]
    assert s["canary"]["at_ceiling"] == (audit["canaries"]["epsilon_lb"] >= audit["canaries"]["epsilon_ceiling"])
    copy = tmp_path / "run"
    shutil.copytree(pipeline_run, copy)
    s["best_attack"].update(name="summary_pick", auc=0.777, auc_ci=[0.701, 0.802], tpr_at_1pct_fpr=0.333)
    s["estimate"]["epsilon"] = 4.321
    (copy / "audit.json").write_text(json.dumps(audit))
    assert main(["report", str(copy), "-o", str(tmp_path / "summary.html")]) == 0
    row = _summary_row((tmp_path / "summary.html").read_text())
    assert "0.777 [0.701, 0.802]" in row and "summary pick" in row and "0.333" in row and "estimate 4.321" in row
    # an audit of format 3 had none: the report gets it from the same function (rendered so in
    # test_what_the_audit_could_have_seen_is_stated_beside_every_bound)
    from reports.evidence import load_run
    from reports.summary import audit_summary as report_summary

    recorded = json.loads((pipeline_run / "audit.json").read_text())
    (copy / "audit.json").write_text(json.dumps({**{k: v for k, v in recorded.items() if k != "summary"},
                                                 "format": "alignfl-audit/3"}))
    assert report_summary(load_run(copy)) == recorded["summary"]


def test_outliers_without_controls_render_as_not_tested(tmp_path):
    cfg = from_dict(tiny_config(name="no-controls", audit=AUDIT, report=True,
                                partition={"outliers": {"count": 6, "client": 0, "holdout": 0}}))
    run = run_pipeline(cfg, out=tmp_path / "run", quiet=True).path
    audit = json.loads((run / "audit.json").read_text())
    o = audit["outliers"]
    assert o["control_rate"] is None and o["memorisation"]["verdict"] == "not tested"
    assert o["typical_mapping"]["verdict"] in ("holds", "fails", "cannot judge")  # needs no controls
    html = (run / "report.html").read_text()
    assert "memorisation cannot be tested on this run" in html
    assert "memorisation: <b>not tested</b><br><span class=\"note\">no controls</span>" in _summary_row(html)
    assert f"mapped to typical: <b>{o['typical_mapping']['verdict']}</b>" in _summary_row(html)


def test_sweep_records_a_failure_keeps_the_others_and_resumes(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_config(audit=AUDIT)))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "mini", "base": "base.yaml", "out": str(tmp_path / "out"), "seeds": [0],
        "runs": [{"label": "ok"},
                 {"label": "broken", "set": {"data.root": str(tmp_path / "no-such-data")}}]}))
    assert main(["sweep", str(sweep), "--quiet"]) == 1
    out = tmp_path / "out"
    status = yaml.safe_load((out / "sweep-status.yaml").read_text())
    assert status["finished"] == ["ok-seed0"] and list(status["failed"]) == ["broken-seed0"]
    assert "no mnist files" in status["failed"]["broken-seed0"]
    assert (out / "report.html").is_file() and (out / "ok-seed0" / "audit.json").is_file()
    first = (out / "ok-seed0" / "metrics.json").read_bytes()
    capsys.readouterr()
    assert main(["sweep", str(sweep), "--quiet"]) == 1  # resumed: the finished run is not redone
    assert "ok-seed0: finished before, skipped" in capsys.readouterr().out
    assert (out / "ok-seed0" / "metrics.json").read_bytes() == first
    edited = yaml.safe_load(sweep.read_text())
    edited["runs"] = [{"label": "ok", "set": {"training.lambda_kl": 0.5}}]  # same label, other settings
    sweep.write_text(yaml.safe_dump(edited))
    assert main(["sweep", str(sweep), "--quiet"]) == 0
    assert "ok-seed0: trained and audited" in capsys.readouterr().out
    assert (out / "ok-seed0.replaced-1").is_dir()  # the stale run is kept aside, not deleted


def test_sweep_file_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbase: nothing.yaml\nruns: [{label: a}]\n")
    assert main(["sweep", str(bad)]) == 2
    dup = tmp_path / "dup.yaml"
    dup.write_text("base: x.yaml\nruns: [{label: a}, {label: a}]\n")
    assert main(["sweep", str(dup)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "cannot read config" in err[0] and "appears twice" in err[1]


def test_report_in_headless_chromium(pipeline_run, tmp_path):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("Chromium is not installed (CI installs Debian's chromium package)")
    shot = pipeline_run / "report-screenshot.png"
    result = inspect_page(binary, (pipeline_run / "report.html").resolve().as_uri(), tmp_path / "profile", shot)
    assert result["console_errors"] == []
    assert result["summary"] and result["rows"] == 1 and result["scripts"] == 0
    assert result["images"] and all(complete and width > 0 for _, complete, width in result["images"]), \
        result["images"]
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert HOSTILE in result["title"]  # shown as text, never executed
