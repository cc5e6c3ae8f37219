"""Summarize benchmarks/results/*.json into the Markdown tables of benchmarks/README.md.

    python benchmarks/summarize.py            # prints the tables
    python benchmarks/summarize.py --write    # writes them into benchmarks/README.md
"""
from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load() -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(RESULTS.glob("*-seed*.json")):
        if path.name.startswith("audit-"):
            continue
        label = re.sub(r"-seed\d+$", "", path.stem)
        groups[label].append(json.loads(path.read_text()))
    return groups


def fmt(values: list[float], digits: int = 4) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table() -> str:
    rows = ["| system | seeds | probe accuracy | probe F1 | domain-CNN FID | TSTR accuracy | wall time (min, each) |",
            "|---|---|---|---|---|---|---|"]
    for label, runs in sorted(load().items()):
        u = [r["utility"] for r in runs]
        walls = [r["benchmark"]["wall_seconds"] / 60 for r in runs]
        rows.append(f"| {label} | {','.join(str(r['seed']) for r in runs)} | {fmt([x['probe_accuracy'] for x in u])} "
                    f"| {fmt([x['probe_f1'] for x in u])} | {fmt([x['fid'] for x in u], 1)} "
                    f"| {fmt([x['tstr_accuracy'] for x in u])} | {fmt(walls, 1)} |")
    return "\n".join(rows)


def bars() -> str:
    groups = load()
    out = []
    for ds in ("mnist", "fmnist"):
        def mean(system):
            runs = groups.get(f"{ds}-{system}")
            return statistics.mean(r["utility"]["probe_accuracy"] for r in runs) if runs else None
        a, f, c = mean("alignfl"), mean("fedavg"), mean("centralized")
        if None in (a, f, c):
            continue
        out.append(f"- {ds}: ALIGN-FL {a:.4f} vs FedAvg + 0.15 = {f + 0.15:.4f} "
                   f"({'met' if a >= f + 0.15 else 'NOT met'}); vs 0.9 x centralized = {0.9 * c:.4f} "
                   f"({'met' if a >= 0.9 * c else 'NOT met'}); ALIGN-FL / centralized = {a / c:.3f}")
    return "\n".join(out)


PAPER_PRIVACY = {"alignfl": ("No-DP", 0.7425), "lcd": ("LCD-VAE", 0.6325), "dpsgd-eps10": ("DP-SGD eps=10", 0.5175)}


def privacy_bars() -> str:
    """The privacy-mechanism bar on MNIST: No-DP > LCD-VAE > DP-SGD(eps=10), each within 10 points of the
    paper's table (seed 0, the seed every mechanism was run with)."""
    groups = load()

    def seed0(label):
        runs = [r for r in groups.get(label, []) if r["seed"] == 0]
        return runs[0]["utility"]["probe_accuracy"] if runs else None

    lcd_labels = sorted(k for k in groups if k.startswith("mnist-lcd-"))
    found = {"alignfl": seed0("mnist-alignfl"), "dpsgd-eps10": seed0("mnist-dpsgd-eps10")}
    lcd = {k: seed0(k) for k in lcd_labels}
    if None in found.values() or not lcd:
        return "(not all of No-DP, LCD-VAE and DP-SGD eps=10 have been run)"
    out = []
    for name, acc in [("alignfl", found["alignfl"]), *[(k, v) for k, v in lcd.items()],
                      ("dpsgd-eps10", found["dpsgd-eps10"])]:
        key = "lcd" if name.startswith("mnist-lcd") else name
        label, paper = PAPER_PRIVACY[key]
        out.append(f"- {name.replace('mnist-', '')} ({label}): {acc:.4f} vs paper {paper:.4f}, "
                   f"difference {acc - paper:+.4f} ({'within' if abs(acc - paper) <= 0.10 else 'NOT within'} 10 points)")
    for k, v in lcd.items():
        order = found["alignfl"] > v > found["dpsgd-eps10"]
        out.append(f"- order No-DP > {k.replace('mnist-', '')} > DP-SGD(eps=10): {found['alignfl']:.4f} > {v:.4f} > "
                   f"{found['dpsgd-eps10']:.4f}: {'holds' if order else 'does NOT hold'}")
    return "\n".join(out)


def dropout_table() -> str:
    """All three rows are made the same way (2 torch threads, one run at a time), seeds 0 and 1."""
    groups = load()
    rows = ["| dropout | participation | seeds | rounds taken part in (per client, of 10; by seed) | probe accuracy | "
            "probe F1 | domain-CNN FID | TSTR accuracy |", "|---|---|---|---|---|---|---|---|"]
    for label, drop, part in (("mnist-alignfl-dropout0", "0%", 1.0), ("mnist-alignfl-dropout30", "30%", 0.7),
                              ("mnist-alignfl-dropout60", "60%", 0.4)):
        runs = sorted(groups.get(label, []), key=lambda r: r["seed"])
        if not runs:
            rows.append(f"| {drop} | {part} | not run | | | | | |")
            continue
        took = "; ".join(", ".join(str(v) for v in r["participation"]["rounds_per_client"].values()) for r in runs)
        u = [r["utility"] for r in runs]
        rows.append(f"| {drop} | {part} | {','.join(str(r['seed']) for r in runs)} | {took} | "
                    f"{fmt([x['probe_accuracy'] for x in u])} | {fmt([x['probe_f1'] for x in u])} | "
                    f"{fmt([x['fid'] for x in u], 1)} | {fmt([x['tstr_accuracy'] for x in u])} |")
    return "\n".join(rows)


def _sibling_table(name: str) -> str:
    """The ``table()`` of another script in this folder (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.table()


def audit_table() -> str:
    return _sibling_table("audit_runs")


def sweep_table() -> str:
    return _sibling_table("sweep_table")


def dp_table() -> str:
    path = RESULTS / "dp_overhead.json"
    if not path.exists():
        return ""
    d = json.loads(path.read_text())
    med = d["median_step_seconds"]
    rows = ["| mode | median step (ms) | DP / non-DP |", "|---|---|---|",
            f"| non-DP | {med['non-dp'] * 1000:.1f} | 1.00 |"]
    rows += [f"| {k} | {med[k] * 1000:.1f} | {v:.2f} |" for k, v in d["overhead_vs_nondp"].items()]
    return "\n".join(rows)


def fill(readme: Path) -> None:
    """Replace the RESULTS_TABLE, BARS and DP_TABLE markers (or the tables that replaced them)."""
    text = readme.read_text()
    for marker, value in (("RESULTS_TABLE", table()), ("BARS", bars()), ("DP_TABLE", dp_table()),
                          ("PRIVACY_BARS", privacy_bars()), ("AUDIT_TABLE", audit_table()),
                          ("DROPOUT_TABLE", dropout_table()), ("SWEEP_TABLE", sweep_table())):
        start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
        block = f"{start}\n{value}\n{end}"
        if start in text:
            text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
        else:
            text = text.replace(f"\n{marker}\n", f"\n{block}\n")
    readme.write_text(text)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write"]:
        fill(Path(__file__).resolve().parent / "README.md")
    else:
        print(table())
        print()
        print(bars())
        print()
        print(dp_table())
        print()
        print(privacy_bars())
        print()
        print(audit_table())
