"""How many canaries and guesses the shipped configs use, and why (README "Canaries").

    python benchmarks/canary_design.py            # about 1.5 minutes of CPU on one core

1. The ceiling of the one-run bound (the most an audit with m canaries and r guesses can show, every
   guess right) for the counts considered, at the configs' delta 1e-5 and 95% confidence.
2. The median bound over simulated runs where canary scores are binormal with a given AUC (members
   N(d, 1), non-members N(0, 1), AUC = Phi(d / sqrt 2)), each canary in with probability 1/2: where
   the attack, not the ceiling, limits the bound.
3. The AUC a paper-scale attack reaches on trained against never-seen cross-domain items: the
   latent-fit reconstruction distance of the 600 outliers against the 500 controls in
   results/audit-*.json (the closest thing to canaries those runs had).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from attacks.empirical_epsilon import one_run_ceiling, one_run_epsilon

RESULTS = Path(__file__).resolve().parent / "results"
DELTA, BETA, FRACTION = 1e-5, 0.05, 0.2
COUNTS = (100, 200, 1000, 2000)
AUCS = (0.55, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99)
TRIALS = 100


def guesses(m: int) -> int:
    return max(1, int(FRACTION * m))  # per side, as the audit does


def simulated_median(m: int, auc: float, rng: np.random.Generator) -> float:
    d = np.sqrt(2) * norm.ppf(auc)
    k = guesses(m)
    bounds = []
    for _ in range(TRIALS):
        included = rng.random(m) < 0.5
        scores = rng.normal(size=m) + d * included
        bounds.append(one_run_epsilon(scores, included, k, k, DELTA, BETA)["epsilon_lb"])
    return float(np.median(bounds))


def paper_scale_aucs() -> list[str]:
    rows = []
    for path in sorted(RESULTS.glob("audit-*.json")):
        groups = (json.loads(path.read_text()).get("outliers") or {}).get("groups", {})
        if "outliers" in groups and "controls" in groups and "distances" in groups["outliers"]:
            out, ctl = np.asarray(groups["outliers"]["distances"]), np.asarray(groups["controls"]["distances"])
            auc = roc_auc_score(np.r_[np.ones(out.size), np.zeros(ctl.size)], -np.r_[out, ctl])
            rows.append(f"| {path.stem.removeprefix('audit-')} | {out.size} / {ctl.size} | {auc:.3f} |")
    return rows


def main() -> None:
    print(f"| canaries m | guesses r | ceiling (delta {DELTA:g}, {1 - BETA:.0%}) |\n|---|---|---|")
    for m in COUNTS:
        print(f"| {m} | {2 * guesses(m)} | {one_run_ceiling(m, 2 * guesses(m), DELTA, BETA):.3f} |")
    rng = np.random.default_rng(0)
    print(f"\nmedian bound over {TRIALS} simulated runs, binormal canary scores\n")
    print("| canary AUC | " + " | ".join(f"m = {m}, r = {2 * guesses(m)}" for m in COUNTS) + " |")
    print("|---|" + "---|" * len(COUNTS))
    for auc in AUCS:
        print(f"| {auc} | " + " | ".join(f"{simulated_median(m, auc, rng):.2f}" for m in COUNTS) + " |")
    print("\nlatent-fit distance, injected outliers against never-seen controls (paper-mnist audits)\n")
    print("| run | outliers / controls | AUC |\n|---|---|---|")
    print("\n".join(paper_scale_aucs()))


if __name__ == "__main__":
    main()
