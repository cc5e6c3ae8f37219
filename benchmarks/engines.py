"""Engines side by side, in one script on one machine (the engine issue's benchmarks).

1. In-process speed before and after the strategy contract: training time of the quickstart (and,
   with ``--paper-before-after``, of one paper-mnist round) at a reference commit (run from a git
   worktree of it) and at this checkout, interleaved, medians of ``--repeats``.
2. Each engine on the same work: the quickstart (training only) and one paper-mnist round, in-process
   and on Flower's simulation runtime.
3. Flower's fixed costs, from a tiny federation at 1 and 3 rounds on both engines:
   per-round overhead = ((F3 - F1) - (I3 - I1)) / 2, start-up = (F1 - I1) - per-round overhead.
4. Clients in parallel (``--parts workers``): one paper-mnist round on Flower's simulation runtime with
   ``engine.client_cpus`` set so that 1, 2, ... clients train at once (cores / client_cpus), against the
   in-process engine (one client after the other), each at ``--threads`` torch threads per process.

    python benchmarks/engines.py --data-root ../shared/datasets --before-worktree /tmp/wt-53b1108

Every run goes through the CLI in a fresh process with the same thread count. Results go to
``benchmarks/results/engines.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import yaml

from cli_runs import ROOT, commit, median, run_cli

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "engines.json"

TINY = {
    "name": "bench-tiny", "seed": 0, "data": {"dataset": "mnist", "allow_embedded": True},
    "partition": {"scheme": "class_disjoint", "client_classes": [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]],
                  "samples_per_class": 30, "holdout_per_class": 10},
    "model": {"arch": "mlp", "latent_dim": 2, "hidden": [32, 16]},
    "training": {"rounds": 1, "local_epochs": 1, "batch_size": 32},
    "server": {"samples_per_client": 40, "epochs": 1, "sampling": "prior"},
    "strategy": {"name": "alignfl"},
    "metrics": {"fid_samples": 100, "domain_cnn_epochs": 1, "tstr_epochs": 1, "figures": False,
                "probe_every_round": False},
    "audit": False, "report": False,
}


def run(config: Path, sets: list[str], threads: int, data_root: str | None, pythonpath: str | None = None) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-")) / "run"
    args = ["run", str(config), "--out", str(out), "--quiet", "--no-audit", "--no-report"]
    if data_root:
        args += ["--data-root", data_root]
    for s in sets:
        args += ["--set", s]
    wall = run_cli(args, threads, pythonpath)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall": round(wall, 2), "train": metrics["timing_seconds"]["train"], "utility": metrics["utility"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="full MNIST (for the paper-mnist round)")
    parser.add_argument("--before-worktree", required=True, help="a git worktree of the reference commit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs per quickstart and tiny measurement")
    parser.add_argument("--paper-repeats", type=int, default=1, help="runs per engine of one paper-mnist round")
    parser.add_argument("--parts", default="all",
                        choices=["all", "before-after", "engines", "fixed-costs", "workers"],
                        help="measure only this part (merged into the existing results file)")
    parser.add_argument("--paper-before-after", action="store_true",
                        help="also time one paper-mnist round at the reference commit and here")
    args = parser.parse_args()
    before = str(Path(args.before_worktree).resolve())
    ref, head = commit(before), commit(ROOT)
    quick, paper = ROOT / "configs" / "quickstart.yaml", ROOT / "configs" / "paper-mnist.yaml"
    quick_before, paper_before = Path(before) / "configs" / "quickstart.yaml", Path(before) / "configs" / "paper-mnist.yaml"
    one_round = ["training.rounds=1"]
    t = args.threads
    out: dict = json.loads(RESULTS.read_text()) if args.parts != "all" and RESULTS.is_file() else {}
    measured = {"threads": t, "repeats": args.repeats, "reference_commit": ref, "commit": head,
                "machine": f"{os.cpu_count()} cores"}
    if args.parts == "workers":  # measured apart from the other parts: its own commit and settings
        measured = {**measured, "paper_repeats": args.paper_repeats}
    else:
        out.update(measured)

    if args.parts in ("all", "before-after"):
        before_after(args, out, before, quick, quick_before, paper, paper_before, one_round, t)
    if args.parts in ("all", "engines"):
        each_engine(args, out, quick, paper, one_round, t)
    if args.parts in ("all", "fixed-costs"):
        fixed_costs(args, out, t)
    if args.parts == "workers":
        workers(args, out, paper, one_round, t)
        out["workers"]["measured"] = measured
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


def before_after(args, out, before, quick, quick_before, paper, paper_before, one_round, t) -> None:
    # 1. in-process before/after, interleaved (the quickstart's training; --paper-before-after adds one
    #    paper-mnist round)
    #    The reference predates canaries, so the "after" runs insert none: both sides do the same work.
    same_work = ["partition.canaries.count=0"]
    pairs = [("quick", quick_before, quick, [], None)]
    if args.paper_before_after:
        pairs.append(("paper1", paper_before, paper, one_round, args.data_root))
    series: dict[str, list] = {}
    for _ in range(args.repeats):
        for name, cfg_before, cfg_after, sets, root in pairs:
            series.setdefault(f"{name}_before", []).append(run(cfg_before, sets, t, root, before))
            series.setdefault(f"{name}_after", []).append(run(cfg_after, sets + same_work, t, root))
        print(json.dumps({k: v[-1]["train"] for k, v in series.items()}), flush=True)
    out["inprocess_before_after"] = {
        k: {"train_seconds": [r["train"] for r in v], "median_train": median([r["train"] for r in v]),
            "median_wall": median([r["wall"] for r in v]), "utility": v[0]["utility"]} for k, v in series.items()}
    for name, *_ in pairs:
        b, a = out["inprocess_before_after"][f"{name}_before"], out["inprocess_before_after"][f"{name}_after"]
        out["inprocess_before_after"][f"{name}_ratio_after_over_before"] = round(a["median_train"] / b["median_train"], 3)



def each_engine(args, out, quick, paper, one_round, t) -> None:
    # 2. each engine on the same work
    engines: dict[str, dict] = {}
    for label, config, sets, root in (("quickstart", quick, [], None), ("paper-mnist-1-round", paper, one_round,
                                                                          args.data_root)):
        for engine in ("inprocess", "flower"):
            reps = args.paper_repeats if root else args.repeats
            runs = [run(config, sets + [f"engine.name={engine}"], t, root) for _ in range(reps)]
            engines[f"{label}/{engine}"] = {"median_wall": median([r["wall"] for r in runs]),
                                            "median_train": median([r["train"] for r in runs]),
                                            "utility": runs[0]["utility"]}
            print(label, engine, engines[f"{label}/{engine}"], flush=True)
    out["engines"] = engines



def fixed_costs(args, out, t) -> None:
    # 3. Flower's fixed costs (after one discarded run: the first run of a config trains and caches the
    #    metrics' domain CNN)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny.yaml"
        path.write_text(yaml.safe_dump(TINY))
        run(path, [], t, None)
        walls = {}
        for engine in ("inprocess", "flower"):
            for rounds in (1, 3):
                walls[engine, rounds] = median([run(path, [f"engine.name={engine}", f"training.rounds={rounds}"], t,
                                                    None)["wall"] for _ in range(args.repeats)])
    per_round = ((walls["flower", 3] - walls["flower", 1]) - (walls["inprocess", 3] - walls["inprocess", 1])) / 2
    out["flower_fixed_costs"] = {"tiny_walls": {f"{e}/{r}": w for (e, r), w in walls.items()},
                                 "per_round_overhead_seconds": round(per_round, 2),
                                 "startup_seconds": round(walls["flower", 1] - walls["inprocess", 1] - per_round, 2)}


def workers(args, out, paper, one_round, t) -> None:
    # 4. clients in parallel: Flower's simulation runs cores // client_cpus clients at once
    cores = os.cpu_count() or 1
    variants = [("inprocess", ["engine.name=inprocess"])]
    variants += [(f"flower/{cores // cpus} at once", ["engine.name=flower", f"engine.client_cpus={cpus}"])
                 for cpus in sorted({cores // n for n in range(1, cores + 1)}, reverse=True)]
    series: dict[str, list] = {}
    for _ in range(args.paper_repeats):  # interleaved
        for label, sets in variants:
            series.setdefault(label, []).append(run(paper, one_round + sets, t, args.data_root))
            print(label, series[label][-1], flush=True)
    out["workers"] = {label: {"train_seconds": [r["train"] for r in runs],
                              "median_train": median([r["train"] for r in runs]),
                              "median_wall": median([r["wall"] for r in runs]), "utility": runs[0]["utility"]}
                      for label, runs in series.items()}


if __name__ == "__main__":
    main()
