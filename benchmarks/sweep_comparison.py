"""One utility-and-leakage table of a paper-scale sweep, seeds side by side, from the sweep's tidy export.

    alignfl-audit sweep configs/sweep-fedhypevae-vs-alignfl.yaml --data-root DIR
    python benchmarks/sweep_comparison.py --import runs/sweep-fedhypevae-vs-alignfl/report.metrics.csv \
        --kept benchmarks/results/sweep-fedhypevae-vs-alignfl.csv

``--import`` keeps the run-level rows of the export in ``--kept`` (as benchmarks/sweep_table.py does); the
table is made from the kept file. One row per sweep entry (the run label without its seed); each cell holds
the seeds' values in seed order, separated by " / ". Columns: accountant ε (headline relation, largest over
clients; "none" where the mechanism has no formal guarantee), paper probe accuracy, TSTR accuracy,
domain-CNN FID, the best membership attack's AUC and TPR at 1% FPR (best by AUC, per run), and the canary
lower bound with the most it could have shown.
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import pandas as pd

from sweep_table import best_of, import_export, run_values

_SEED = re.compile(r"^(?P<entry>.+)-seed(?P<seed>\d+)$")


def _cells(value: dict) -> dict[str, str]:
    def num(key):
        return float(value[key])

    formal = str(value.get("privacy:formal_guarantee")) == "True"
    eps = f"{num('accountant:epsilon'):.2f}" if "accountant:epsilon" in value else "n/a (not audited)"
    cells = {"ε": eps if formal else "none",
             "probe": f"{num('utility:probe_accuracy'):.3f}", "TSTR": f"{num('utility:tstr_accuracy'):.3f}",
             "FID": f"{num('utility:fid'):.0f}"}
    best = best_of(value)
    if best is None:
        return {**cells, "best attack": "not audited", "AUC": "", "TPR@1%FPR": "", "canary ε_lb (ceiling)": ""}
    return {**cells, "best attack": best, "AUC": f"{num(f'mia:{best}.auc'):.3f}",
            "TPR@1%FPR": f"{num(f'mia:{best}.tpr_at_1pct_fpr'):.3f}",
            "canary ε_lb (ceiling)": f"{num('canaries:epsilon_lb'):.2f} ({num('canaries:epsilon_ceiling'):.2f})"}


def table(kept: Path) -> str:
    entries: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for run, value in run_values(pd.read_csv(kept)):
        match = _SEED.match(run)
        entry, seed = (match["entry"], int(match["seed"])) if match else (run, 0)
        entries[entry].append((seed, _cells(value)))
    columns = ["ε", "probe", "TSTR", "FID", "best attack", "AUC", "TPR@1%FPR", "canary ε_lb (ceiling)"]
    rows = ["| run | seeds | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for entry, seeds in entries.items():
        seeds.sort(key=lambda s: s[0])
        cells = [" / ".join(dict.fromkeys(c[col] for _, c in seeds)) if col == "best attack"
                 else " / ".join(c[col] for _, c in seeds) for col in columns]
        rows.append(f"| {entry} | {', '.join(str(s) for s, _ in seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--import", dest="src", type=Path, help="the sweep's report.metrics.csv")
    parser.add_argument("--kept", type=Path, required=True, help="the kept run-level rows (written by --import)")
    args = parser.parse_args()
    if args.src:
        print(f"kept {import_export(args.src, args.kept)} rows in {args.kept}")
    print(table(args.kept))


if __name__ == "__main__":
    main()
