"""Audit benchmark: ``alignfl-audit audit`` on finished paper-mnist runs (No-DP, DP-SGD, LCD-VAE, ...).

    python benchmarks/audit_runs.py --labels mnist-alignfl-seed0 mnist-dpsgd-eps10-seed0 mnist-lcd-0.1-seed0
    python benchmarks/audit_runs.py --table            # print the README table from results/audit-*.json

Each label is a run directory under benchmarks/runs/ made by reproduce_paper.py. The audit goes
through the product's CLI with the run's own audit settings; its audit.json is copied to
results/audit-<label>.json with the audit's wall time next to the run's training time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


def audit_one(label: str, data_root: str, threads: int) -> str:
    run = HERE / "runs" / label
    if not (run / "metrics.json").is_file():
        return f"{label}: no finished run at {run}"
    cmd = [sys.executable, "-m", "alignfl_audit.cli", "audit", str(run), "--quiet", "--data-root", data_root]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return f"{label}: FAILED {proc.stderr.strip()}"
    audit = json.loads((run / "audit.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    audit["benchmark"] = {"label": label, "command": " ".join(cmd[1:]), "audit_wall_seconds": round(wall, 1),
                          "train_seconds": metrics["timing_seconds"]["train"], "threads": threads,
                          "probe_accuracy": metrics["utility"]["probe_accuracy"]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"audit-{label}.json").write_text(json.dumps(audit, indent=1) + "\n")
    return f"{label}: audited in {wall:.0f}s"


def table() -> str:
    from alignfl_audit.audit_summary import read_summary
    from attacks.outlier_verdicts import TYPICAL_MAPPING_RATE, outlier_verdicts
    from attacks.selection import largest_ceiling

    rows = ["| run | probe acc. | accountant ε | best attack | AUC [95% CI] | TPR@1%FPR | ε estimate (CP) "
            "(the most this audit could have shown) | "
            "outliers / controls reconstructed | normalized distance, 5th percentile: outliers / controls / inliers | "
            "outliers closer than controls (p) | outliers memorised | mapped to typical: outliers / controls / "
            "inliers | outliers mapped to typical points (claim) | Lipschitz lower–upper (client 0) | "
            "audit / train time (min) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("audit-*.json")):
        a = json.loads(path.read_text())
        b = a["benchmark"]
        s = read_summary(a)  # the audit's picks (computed by the audit's own function for these older files)
        m, acc = s["best_attack"], s["accountant"]
        eps = f"{acc['epsilon']:.2f}" if acc["formal_guarantee"] else "none (no formal guarantee)"
        o = a["outliers"] or {}
        groups = o.get("groups", {})
        comparison = groups.get("comparison")
        outl, closer, memorised, claim = "n/a", "n/a", "n/a", "n/a"
        if comparison:
            outl = f"{o['reconstruction_rate']:.3f} / {o['control_rate']:.3f}"
            closer = f"{comparison['outliers_closer_p_value']:.2g}"
        if "outliers" in groups:
            # both verdicts under the audit's current rules, from the recorded rates, p-value and mappings
            v = outlier_verdicts(groups, a["settings"]["alpha"],
                                 a["settings"].get("typical_mapping_rate", TYPICAL_MAPPING_RATE))
            memorised, claim = v["memorisation"]["verdict"], v["typical_mapping"]["verdict"]
        typical = " / ".join(f"{groups[g]['mapped_to_typical']:.3f}" if g in groups else "n/a"
                             for g in ("outliers", "controls", "inliers"))
        p05 = " / ".join(f"{groups[g]['normalized']['p05']:.2f}" if g in groups else "n/a"
                         for g in ("outliers", "controls", "inliers"))
        lip = a["lipschitz"]["0"]
        # the estimate's ceiling; audits written before it was recorded: from their recorded counts
        ceiling = s["estimate"]["ceiling"]
        if ceiling is None:
            ceiling = largest_ceiling(a["empirical_epsilon_detail"]["per_attack"])
        rows.append(f"| {b['label']} | {b['probe_accuracy']:.4f} | {eps} | {m['name']} | {m['auc']:.3f} "
                    f"[{m['auc_ci'][0]:.3f}, {m['auc_ci'][1]:.3f}] | {m['tpr_at_1pct_fpr']:.3f} | "
                    f"{s['estimate']['epsilon']:.3f} ({ceiling:.2f}) | {outl} | {p05} | {closer} | {memorised} | "
                    f"{typical} | {claim} | "
                    f"{lip['lower']:.2f}–{lip['upper']:.1f} | "
                    f"{b['audit_wall_seconds'] / 60:.1f} / {b['train_seconds'] / 60:.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", nargs="*", default=[])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "datasets"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    for label in args.labels:
        print(audit_one(label, args.data_root, args.threads), flush=True)
    if args.table:
        print(table())


if __name__ == "__main__":
    main()
