"""Training and audit speed before and after, phase by phase, in one script on one machine (issue 15).

Each run is ``alignfl-audit run CONFIG`` (trained and audited, no report) in a fresh process, through
``benchmarks/phase_timer.py``, at a reference commit (a git worktree of it, ``--before-worktree``) and at
this checkout, interleaved (before, after, before, after, ...) at the same thread count. Per phase the
JSON holds every measurement, the median per side and the ratio after / before:

- client_training, server_synthesis, server_training, probes (per round), metrics (+ its domain CNN);
- each audit phase of audit.json (references, membership, outliers, lipschitz, canaries) and its total;
- train (metrics.json: data, partition, every round) and the process's wall time.

Beside the times, per side and seed: the probe accuracy and the best membership AUC (utility and leakage
must stay within seed noise). The after side gets ``--same-work`` overrides (by default no canaries: the
reference commit predates them) and ``--after-set`` ones (e.g. ``training.precision=bf16``).

    python benchmarks/performance.py --before-worktree ../wt-v1 --config configs/paper-mnist.yaml \\
        --data-root ../shared/datasets --threads 2 --repeats 1 --seeds 0 1

Results: ``benchmarks/results/performance.json`` (``--output`` to change it). ``--reuse-before FILE`` takes
the before side's runs from an earlier results file (same reference commit, config, thread count and
seeds) and runs only the after side, e.g. to measure another ``--after-set`` against the same reference.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from cli_runs import ROOT, commit, median, run_cli

HERE = Path(__file__).resolve().parent
TIMER = HERE / "phase_timer.py"
AUDIT_PHASES = ("references", "membership", "outliers", "lipschitz", "canaries", "audit")


def one_run(side: str, worktree: str | None, config: str, seed: int, sets: list[str], threads: int,
            data_root: str | None, cache: str) -> dict:
    """One trained and audited run; its phase seconds, probe accuracy and best AUC."""
    tmp = Path(tempfile.mkdtemp(prefix=f"perf-{side}-"))
    run_dir, times = tmp / "run", tmp / "phases.json"
    args = ["run", config, "--out", str(run_dir), "--quiet", "--no-report", "--seed", str(seed)]
    if data_root:
        args += ["--data-root", data_root]
    for s in sets:
        args += ["--set", s]
    wall = run_cli(args, threads, worktree, prefix=[str(TIMER), str(times)], ALIGNFL_CACHE_DIR=cache)
    phases = json.loads(times.read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    audit = json.loads((run_dir / "audit.json").read_text())
    phases.update({f"audit_{k}": v for k, v in audit["timing_seconds"].items() if k in AUDIT_PHASES})
    phases.update(train=metrics["timing_seconds"]["train"], wall=round(wall, 2))
    best = max(audit["mia"], key=lambda name: audit["mia"][name]["auc"])
    return {"seed": seed, "seconds": phases, "probe_accuracy": metrics["utility"]["probe_accuracy"],
            "best_auc": audit["mia"][best]["auc"], "best_attack": best}


def warm_domain_cnn(worktree: str, config: str, sets: list[str], data_root: str | None, threads: int,
                    cache: str) -> None:
    """Train one side's domain CNN (of the metrics) into the cache before the timed runs, so that no
    side's first run pays for it: it is trained once per cache, and the two sides key it differently."""
    code = ("import sys, torch; from alignfl_audit.config import load_config; "
            "from alignfl_audit.orchestrate import load_data, _digest; from federation.training import to_tensor; "
            "from federation.metrics.domain_cnn import domain_cnn; "
            "sets = dict(s.split('=', 1) for s in sys.argv[3:]); import yaml; "
            "cfg = load_config(sys.argv[1], {k: yaml.safe_load(v) for k, v in sets.items()}); "
            "d = load_data(cfg, sys.argv[2] or None); "
            "domain_cnn(cfg.data.dataset, to_tensor(d.train.images), torch.as_tensor(d.train.labels), "
            "_digest(d.train.files), cfg.seed, cfg.metrics.domain_cnn_epochs)")
    run_cli([config, data_root or "", *sets], threads, worktree, prefix=["-c", code], ALIGNFL_CACHE_DIR=cache)


def summarize(runs: dict[str, list[dict]]) -> dict:
    phases = sorted({k for side in runs.values() for r in side for k in r["seconds"]})
    out = {}
    for phase in phases:
        entry = {}
        for side in ("before", "after"):
            values = [r["seconds"][phase] for r in runs[side] if phase in r["seconds"]]
            entry[side] = values
            entry[f"median_{side}"] = median(values) if values else None
        b, a = entry["median_before"], entry["median_after"]
        entry["ratio_after_over_before"] = round(a / b, 3) if a is not None and b else None
        out[phase] = entry
    return out


def _reused_before(args, before: str) -> list[dict]:
    earlier = json.loads(Path(args.reuse_before).read_text())
    mine = {"reference_commit": commit(before), "config": args.config, "threads": args.threads,
            "seeds": args.seeds, "both_sides_set": args.set}
    differ = {k: (earlier.get(k), v) for k, v in mine.items() if earlier.get(k) != v}
    if differ:
        raise SystemExit(f"--reuse-before {args.reuse_before}: measured under other settings {differ}")
    return earlier["runs"]["before"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before-worktree", required=True, help="a git worktree of the reference commit")
    parser.add_argument("--config", default="configs/quickstart.yaml", help="relative to either worktree")
    parser.add_argument("--data-root", help="full MNIST/Fashion-MNIST (paper configs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="before/after pairs per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="both sides")
    parser.add_argument("--same-work", action="append", metavar="KEY=VALUE",
                        help="after side only, so that it does the reference's work (default: "
                             "partition.canaries.count=0, the reference commit predates canaries)")
    parser.add_argument("--after-set", action="append", default=[], metavar="KEY=VALUE",
                        help="after side only: the settings under test (e.g. training.precision=bf16)")
    parser.add_argument("--output", default=str(HERE / "results" / "performance.json"))
    parser.add_argument("--reuse-before", metavar="FILE", help="the before runs of an earlier results file")
    args = parser.parse_args()
    before = str(Path(args.before_worktree).resolve())
    if args.data_root:  # each side runs in its own worktree
        args.data_root = str(Path(args.data_root).resolve())
    same_work = args.same_work if args.same_work is not None else ["partition.canaries.count=0"]
    after_sets = args.set + same_work + args.after_set
    reused = _reused_before(args, before) if args.reuse_before else None
    cache = tempfile.mkdtemp(prefix="perf-cache-")  # the domain CNNs, one per side
    if reused is None:
        warm_domain_cnn(before, args.config, args.set, args.data_root, args.threads, cache)
    warm_domain_cnn(str(ROOT), args.config, after_sets, args.data_root, args.threads, cache)
    runs: dict[str, list[dict]] = {"before": list(reused or []), "after": []}
    for repeat in range(args.repeats):
        for seed in args.seeds:
            if reused is None:
                runs["before"].append(one_run("before", before, args.config, seed, args.set, args.threads,
                                              args.data_root, cache))
            runs["after"].append(one_run("after", str(ROOT), args.config, seed, after_sets, args.threads,
                                         args.data_root, cache))
            print(json.dumps({"repeat": repeat, "seed": seed,
                              **{side: {k: r[-1]["seconds"].get(k) for k in ("train", "audit_audit", "wall")}
                                 for side, r in runs.items()}}), flush=True)
    result = {
        "config": args.config, "threads": args.threads, "repeats": args.repeats, "seeds": args.seeds,
        "reference_commit": commit(before), "commit": commit(ROOT), "machine": f"{os.cpu_count()} cores",
        "both_sides_set": args.set, "after_side_set": same_work + args.after_set,
        "phases": summarize(runs),
        "utility_and_leakage": {side: [{k: r[k] for k in ("seed", "probe_accuracy", "best_auc", "best_attack")}
                                       for r in side_runs] for side, side_runs in runs.items()},
        "before_reused_from": args.reuse_before,
        "runs": runs,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
