"""The DP-SGD vs LCD-VAE sweep's README table, from the sweep's tidy metrics export.

    alignfl-audit sweep configs/sweep-dp-vs-lcd.yaml
    python benchmarks/sweep_table.py --import runs/sweep-dp-vs-lcd/report.metrics.csv
    python benchmarks/summarize.py --write

``--import`` keeps the run-level rows of the export (pooled attacks, headline and per-client ε,
client-level Lipschitz bracket, outliers; no per-client attack, per-round or per-record rows) in
results/sweep-dp-vs-lcd-quickstart.csv, which the table is made from.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from attacks.selection import best_attack

RESULTS = Path(__file__).resolve().parent / "results"
KEPT = RESULTS / "sweep-dp-vs-lcd-quickstart.csv"
_DROPPED = r"clients\.|\.rounds\.|^groups\.(?:outliers|controls|inliers)\.(?:distance|normalized)"


def import_export(src: Path, dest: Path = KEPT) -> int:
    tidy = pd.read_csv(src)
    metric = tidy["metric"].fillna("")
    kept = tidy[tidy["metric"].notna() & ~metric.str.contains(_DROPPED, regex=True)
                & (tidy["section"] != "empirical_epsilon_detail")]
    dest.parent.mkdir(parents=True, exist_ok=True)
    kept.to_csv(dest, index=False)
    return len(kept)


def run_values(tidy: pd.DataFrame):
    """(run label, {"section:metric": value}) for every run of a kept export, in the export's order."""
    for run, g in tidy.groupby("run", sort=False):
        yield run.split("(")[-1].rstrip(")"), dict(zip(g["section"] + ":" + g["metric"], g["value"]))


def best_of(value: dict) -> str | None:
    """The run's best pooled membership attack by AUC (``attacks.selection``); None for a run not audited."""
    attacks = [k[len("mia:"):-len(".auc")] for k in value if k.startswith("mia:") and k.endswith(".auc")]
    return best_attack({a: {"auc": float(value[f"mia:{a}.auc"])} for a in attacks}) if attacks else None


def table() -> str:
    if not KEPT.is_file():
        return "(the sweep has not been imported: see benchmarks/sweep_table.py)"
    tidy = pd.read_csv(KEPT)
    rows = ["| run | formal guarantee | accountant ε (headline, max over clients) | probe acc. | best attack | "
            "AUC [95% CI] | TPR@1%FPR | ε estimate (CP) | outliers closer than controls (p) | "
            "Lipschitz lower–upper (client 0) | train / total time (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run, value in run_values(tidy):

        def num(key):
            return float(value[key])

        formal = str(value["privacy:formal_guarantee"]) == "True"
        eps = f"{num('accountant:epsilon'):.2f}" if formal else "none (no formal guarantee)"
        best = best_of(value)
        if best is None:
            rows.append(f"| {run} | not audited |" + " |" * 9)
            continue
        rows.append(
            f"| {run} | {'yes' if formal else 'no'} | {eps} | "
            f"{num('utility:probe_accuracy'):.3f} | {best} | {num(f'mia:{best}.auc'):.3f} "
            f"[{num(f'mia:{best}.auc_ci_low'):.3f}, {num(f'mia:{best}.auc_ci_high'):.3f}] | "
            f"{num(f'mia:{best}.tpr_at_1pct_fpr'):.3f} | {num('audit:empirical_epsilon'):.3f} | "
            f"{num('outliers:groups.comparison.outliers_closer_p_value'):.2g} | "
            f"{num('lipschitz:0.lower'):.2f}–{num('lipschitz:0.upper'):.1f} | "
            f"{num('timing:train'):.0f} / {num('timing:total'):.0f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--import", dest="src", type=Path, help="the sweep's report.metrics.csv")
    args = parser.parse_args()
    if args.src:
        print(f"kept {import_export(args.src)} rows in {KEPT}")
    print(table())


if __name__ == "__main__":
    main()
