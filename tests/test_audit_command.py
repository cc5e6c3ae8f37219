"""``alignfl-audit audit RUN_DIR`` on tiny finished runs: the audit.json contract, determinism, that it
needs nothing beyond the shared artifacts and the partition record, the canary switch, and that a
DP run's empirical bound stays under its accountant epsilon."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from alignfl_audit.cli import main
from conftest import tiny_config
from alignfl_audit.config import from_dict
from alignfl_audit.orchestrate import run_experiment

pytestmark = pytest.mark.usefixtures("one_torch_thread")

AUDIT = {"members_per_client": 30, "latent_fit_steps": 15, "latent_fit_init": 256, "latent_fit_restarts": 2,
         "generated_samples": 500, "bootstrap": 20, "inliers": 20, "lipschitz_prior_points": 32,
         "lipschitz_ascent_steps": 3, "reference_epochs": 2}


def _run(tmp_path_factory, name: str, **overrides):
    cfg = from_dict(tiny_config(name=name, audit=AUDIT, **overrides))
    return run_experiment(cfg, out=tmp_path_factory.mktemp(name) / "run", quiet=True).path


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    run = _run(tmp_path_factory, "audited", training={"rounds": 2},
               partition={"outliers": {"count": 10, "client": 0, "holdout": 10},
                          "canaries": {"count": 20, "client": 1}})
    assert main(["audit", str(run), "--quiet"]) == 0
    return run, json.loads((run / "audit.json").read_text())


def test_audit_json_has_the_contracted_fields(audited):
    run, audit = audited
    attacks = {"white_box_latent_fit", "monte_carlo", "nearest_generated_sample",
               "white_box_latent_fit_calibrated", "monte_carlo_calibrated"}
    assert set(audit["mia"]) == attacks
    for name, m in audit["mia"].items():
        assert 0 <= m["auc"] <= 1 and 0 <= m["tpr_at_1pct_fpr"] <= 1
        assert m["auc_ci"][0] <= m["auc_ci"][1]
        assert set(m["clients"]) == {"0", "1", "2"}
        assert m["n_members"] == m["n_nonmembers"]
    assert 0 <= audit["outliers"]["reconstruction_rate"] <= 1
    assert 0 <= audit["outliers"]["control_rate"] <= 1
    assert audit["outliers"]["groups"]["outliers"]["n"] == 10
    for cid in ("0", "1", "2"):
        bracket = audit["lipschitz"][cid]
        assert 0 < bracket["lower"] <= bracket["upper"]
        assert set(bracket["rounds"]) == {"0", "1"}
    assert audit["empirical_epsilon"] >= 0 and "not a proof" in audit["empirical_epsilon_kind"]
    assert audit["canaries"]["m"] == 20 and audit["canaries"]["client"] == 1
    assert audit["empirical_epsilon_proven"] == audit["canaries"]["epsilon_lb"]
    o = audit["outliers"]
    assert o["memorisation"]["verdict"] in ("memorised", "not memorised")
    assert o["typical_mapping"]["verdict"] in ("holds", "fails", "cannot judge")
    assert o["typical_mapping"]["required_rate"] == audit["settings"]["typical_mapping_rate"] == 0.9
    # the verdicts are those of the recorded numbers, and neither is the old single verdict
    from attacks.outlier_verdicts import outlier_verdicts
    assert outlier_verdicts(o["groups"], audit["settings"]["alpha"], 0.9) == {
        "memorisation": o["memorisation"], "typical_mapping": o["typical_mapping"]}
    assert "verdict" not in o and "claim_holds" not in o
    assert o["typical_mapping"]["inliers_mapped_to_typical"] == o["groups"]["inliers"]["mapped_to_typical"]
    assert set(o["normalized_distance_percentiles"]) == {"outliers", "controls", "inliers"}
    for name, q in o["normalized_distance_percentiles"].items():
        assert q["p05"] <= q["p25"] <= q["median"] <= q["p75"] <= q["p95"]
        assert q["median"] == o["groups"][name]["normalized"]["median"]
    assert not (run / "checkpoints").exists()  # resume state is gone once the run is complete
    assert audit["accountant"]["formal_guarantee"] is False and audit["accountant"]["epsilon"] is None
    evidence = np.load(run / "audit" / "scores.npz", allow_pickle=False)
    assert len(evidence["labels"]) == len(evidence["white_box_latent_fit__scores"])
    assert (run / audit["outliers"]["figures"]["outliers"]).is_file()


def test_what_the_audit_could_have_seen_is_recorded_and_printed(audited, capsys, tmp_path):
    from alignfl_audit.cli import _print_audit
    from attacks.empirical_epsilon import clopper_pearson_ceiling, one_run_ceiling
    from attacks.sensitivity import auc_half_width

    run, audit = audited
    c, alpha = audit["canaries"], audit["settings"]["alpha"]
    assert c["r"] == 8  # 20 canaries, 0.2 of them guessed on each side
    assert c["epsilon_ceiling"] == one_run_ceiling(20, 8, c["delta"], alpha)
    assert audit["empirical_epsilon_proven_ceiling"] == c["epsilon_ceiling"]
    assert 0 <= c["epsilon_lb"] <= c["epsilon_ceiling"]
    cp = audit["empirical_epsilon_detail"]
    for res in cp["per_attack"].values():
        assert res["epsilon_lb"] <= res["epsilon_ceiling"] == clopper_pearson_ceiling(
            res["n_members_eval"], res["n_nonmembers_eval"], res["delta"], res["alpha"], res["n_candidates"])
    assert audit["empirical_epsilon_ceiling"] == max(r["epsilon_ceiling"] for r in cp["per_attack"].values())
    s = audit["sensitivity"]
    pooled = audit["mia"]["white_box_latent_fit"]
    g = s["membership_game"]
    assert (g["n_members"], g["n_nonmembers"]) == (pooled["n_members"], pooled["n_nonmembers"])
    assert g["auc_half_width"] == auc_half_width(pooled["n_members"], pooled["n_nonmembers"], 1 - alpha) > 0
    assert "Hanley-McNeil" in g["method"] and set(g["clients"]) == {"0", "1", "2"}
    for cid, cg in g["clients"].items():
        n = pooled["clients"][cid]["n_members"]
        assert cg["auc_half_width"] == auc_half_width(n, n, 1 - alpha) > g["auc_half_width"]
    assert s["canaries"]["epsilon_ceiling"] == c["epsilon_ceiling"] and s["canary_note"] is None
    assert s["membership_estimate_ceiling"] == audit["empirical_epsilon_ceiling"]
    _print_audit(run / "audit.json")
    line = capsys.readouterr().out
    assert f"chance band 0.5 +- {g['auc_half_width']:.3f}" in line
    assert (f"canary lower bound epsilon>={c['epsilon_lb']:.3f} (the most this audit could have shown: "
            f"{c['epsilon_ceiling']:.3f}; 20 canaries, 8 guesses)") in line
    assert f"(the most this audit could have shown: {audit['empirical_epsilon_ceiling']:.3f}; not a proof" in line
    # the line is the summary's: what the audit picked, not picked again when printed
    from alignfl_audit.audit_summary import audit_summary
    assert audit["summary"] == audit_summary({k: v for k, v in audit.items() if k != "summary"})
    assert audit["summary"]["best_attack"]["name"] == max(audit["mia"], key=lambda n: audit["mia"][n]["auc"])
    assert audit["summary"]["canary"]["epsilon_lb"] == c["epsilon_lb"] and audit["summary"]["accountant"] == {
        "formal_guarantee": False, "relation": None, "epsilon": None, "epsilon_add_remove": None, "delta": None}
    tampered = dict(audit, summary={**audit["summary"], "best_attack": {**audit["summary"]["best_attack"],
                                                                         "name": "summary_pick", "auc": 0.777}})
    (tmp_path / "audit.json").write_text(json.dumps(tampered))
    _print_audit(tmp_path / "audit.json")
    assert "best AUC 0.777 (summary_pick;" in capsys.readouterr().out
    # a reviewer checks the canary figure by hand from its counts alone
    assert main(["canary-bound", "--canaries", str(c["m"]), "--guesses", str(c["r"]), "--correct", str(c["v"]),
                 "--delta", repr(c["delta"]), "--alpha", repr(c["beta"]), "--json"]) == 0
    by_hand = json.loads(capsys.readouterr().out)
    assert (by_hand["epsilon_lb"], by_hand["epsilon_ceiling"]) == (c["epsilon_lb"], c["epsilon_ceiling"])


def test_the_membership_game_is_class_matched_and_its_counts_are_recorded(audited):
    from federation.data.sources import load_split, resolve_source

    run, audit = audited
    labels = load_split(resolve_source("mnist"), "mnist", "train").labels
    evidence = np.load(run / "audit" / "scores.npz", allow_pickle=False)
    games = audit["membership_game"]["clients"]
    assert set(games) == {"0", "1", "2"} and "class-matched" in audit["membership_game"]["design"]
    for cid, game in games.items():
        mine = evidence["client"] == int(cid)
        ids, member = evidence["record_id"][mine], evidence["labels"][mine]
        counted = {str(c): int(n) for c, n in zip(*np.unique(labels[ids[member]], return_counts=True))}
        assert {c: n for c, n in game["members_per_class"].items() if n} == counted
        assert game["nonmembers_per_class"] == game["members_per_class"]
        np.testing.assert_array_equal(np.sort(labels[ids[member]]), np.sort(labels[ids[~member]]))
        for c, cut in game["shrunk_classes"].items():  # 30 members drawn over 3 classes, 10 held out per class
            assert cut["kept"] == cut["holdout"] == 10 < cut["drawn"] and game["members_per_class"][c] == 10


def test_canaries_are_recorded_and_only_included_ones_are_trained_on(audited):
    run, _ = audited
    part = json.loads((run / "partition.json").read_text())
    c = part["canaries"]
    included = np.asarray(c["ids"])[np.asarray(c["included"], bool)]
    assert len(c["ids"]) == 20 and 0 < len(included) < 20
    client1 = part["clients"][1]
    assert client1["n_train"] == len(client1["train_ids"]) + len(included)
    assert not set(c["ids"]) & set(part["outliers"]["ids"]) and not set(c["ids"]) & set(part["outliers"]["control_ids"])


def test_audit_is_deterministic_and_needs_only_shared_artifacts_and_the_partition(audited, tmp_path):
    run, first = audited
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copytree(run / "shared", bare / "shared")
    # the adversary's view, the ground truth, the recipe, and the two files that say the run finished and
    # which data files it read; no ledger, no rounds, no figures, no checkpoint
    for name in ("partition.json", "config.resolved.yaml", "status.json", "metrics.json"):
        shutil.copy(run / name, bare / name)
    assert main(["audit", str(bare), "--quiet"]) == 0
    second = json.loads((bare / "audit.json").read_text())
    for key in ("mia", "outliers", "lipschitz", "empirical_epsilon", "canaries"):
        a, b = json.dumps(first[key], sort_keys=True), json.dumps(second[key], sort_keys=True)
        assert a.replace(str(run), "RUN") == b.replace(str(bare), "RUN"), key


def test_dp_run_empirical_epsilon_stays_below_the_accountant(tmp_path_factory):
    run = _run(tmp_path_factory, "dp", privacy={"mechanism": "dp-sgd", "target_epsilon": 1.0,
                                                             "delta": 1e-5, "clipping": "fixed"})
    assert main(["audit", str(run), "--quiet", "--set", "audit.reference_models=false"]) == 0
    audit = json.loads((run / "audit.json").read_text())
    acc = audit["accountant"]
    # sigma is calibrated to the target under replace-one, the headline; add/remove lies below it
    assert acc["formal_guarantee"] is True and 0 < acc["epsilon_add_remove"] < acc["epsilon"] <= 1.0
    assert acc["relation"] == "replace-one"
    assert audit["empirical_epsilon"] <= acc["epsilon_add_remove"]
    assert audit["summary"]["accountant"] == {"formal_guarantee": True, "relation": "replace-one",
                                              "epsilon": acc["epsilon"], "delta": 1e-5,
                                              "epsilon_add_remove": acc["epsilon_add_remove"]}
    assert set(audit["mia"]) == {"white_box_latent_fit", "monte_carlo", "nearest_generated_sample"}


def test_audit_errors_are_one_line(tmp_path, capsys, audited):
    run = audited[0]
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run / "shared", unfinished / "shared")
    shutil.copy(run / "partition.json", unfinished / "partition.json")
    (unfinished / "status.json").write_text('{"state": "running"}')
    assert main(["audit", str(tmp_path / "missing"), "--quiet"]) == 2
    assert main(["audit", str(run), "--quiet", "--set", "training.rounds=3"]) == 2
    assert main(["audit", str(run), "--quiet", "--set", "audit.alpha=2"]) == 2
    assert main(["audit", str(unfinished), "--quiet"]) == 2
    assert main(["audit", str(run), "--quiet", "--seed", "-1"]) == 2
    assert main(["audit", str(run), "--quiet", "--set", "audit.typical_mapping_rate=1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 6 and all(line.startswith("alignfl-audit: error: ") for line in err)
    assert "no run directory" in err[0] and "audit.*" in err[1] and "audit.alpha" in err[2]
    assert "not a finished run" in err[3] and "--seed must be >= 0" in err[4]
    assert "audit.typical_mapping_rate must be in (0, 1], got 1.5" in err[5]


def test_audit_refuses_data_that_differs_from_the_run(audited, full_data_root, capsys):
    run, _ = audited
    before = (run / "audit.json").read_bytes()
    assert main(["audit", str(run), "--quiet", "--data-root", str(full_data_root)]) == 2
    err = capsys.readouterr().err
    assert "differs from the file the run used" in err and err.count("\n") == 1
    assert (run / "audit.json").read_bytes() == before  # a failed audit loses nothing


def test_audit_of_the_centralized_reference_is_refused_before_training(tmp_path, capsys):
    import yaml

    from alignfl_audit.config import ConfigError

    cfg = tiny_config(strategy={"name": "centralized"}, audit=True)
    with pytest.raises(ConfigError, match="the centralized strategy shares nothing"):
        from_dict(cfg)
    path = tmp_path / "centralized.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "nothing to audit" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # --no-audit is applied before validation, so the same config runs without editing it
    assert main(["run", str(path), "--no-audit", "--no-report", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    resolved = yaml.safe_load((tmp_path / "run" / "config.resolved.yaml").read_text())
    assert resolved["audit"]["enabled"] is False and resolved["report"] is False
    assert not (tmp_path / "run" / "audit.json").exists()
    # its report says there is nothing to audit, not that an audit is missing
    assert main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "report.html")]) == 0
    html = (tmp_path / "report.html").read_text()
    assert "shares nothing, so there is nothing to audit" in html and "Not audited" not in html
