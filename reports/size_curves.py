"""The figure "leakage against client data size": for runs that differ in their records per class, best
membership AUC, TPR at 1% FPR, the canary lower bound and probe accuracy against that size, one line per
mechanism (the mean over seeds; every seed a point). Every number is read from the runs' files: the size from
metrics.json's partition (the records each class was trained on), the mechanism from metrics.json's privacy
block and the resolved config, the leakage from audit.json's summary block."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import yaml
from matplotlib.ticker import NullFormatter

from reports.evidence import RunEvidence
from reports.figures import _uri, plt
from reports.summary import audit_summary


@dataclass
class SizePoint:
    mechanism: str  # the line's label
    records_per_class: float
    seed: int | None
    summary: dict | None  # audit.json's summary block; None: not audited
    probe_accuracy: float


def records_per_class(run: RunEvidence) -> float | None:
    """The mean over the run's classes of the training records each class gave (metrics.json's partition); None
    for a run that did not record its partition."""
    clients = (run.metrics.get("partition") or {}).get("clients") or []
    counts = [n for c in clients for n in (c.get("class_counts") or {}).values()]
    return float(np.mean(counts)) if counts else None


def _resolved_privacy(run: RunEvidence) -> dict:
    try:
        config = yaml.safe_load(run.config_text or "") or {}
    except yaml.YAMLError:
        return {}
    return config.get("privacy") or {} if isinstance(config, dict) else {}


def mechanism_label(run: RunEvidence) -> str:
    """The recorded mechanism and its setting. Only a run with a formal guarantee is named with an epsilon (its
    recorded target); every other run is labelled as having none."""
    privacy = run.metrics.get("privacy", {})
    mechanism = privacy.get("mechanism", "none")
    if privacy.get("formal_guarantee"):
        target = privacy.get("target_epsilon")
        setting = f"target ε {target:g}" if target is not None else "explicit noise multiplier"
        return f"DP-SGD, {setting} (δ {privacy.get('delta'):g})"
    if mechanism in ("lcd", "lcd-spectral"):
        lam = _resolved_privacy(run).get("lcd_lambda")
        name = "LCD-VAE" if mechanism == "lcd" else "LCD-VAE (spectral)"
        return f"{name}{f' λ {lam:g}' if lam is not None else ''} (no formal guarantee)"
    return ("No DP" if mechanism == "none" else mechanism) + " (no formal guarantee)"


def size_points(runs: list[RunEvidence]) -> list[SizePoint] | None:
    """One point per run that recorded its size, or None when those runs do not differ in size (no figure)."""
    strategies = {r.metrics.get("strategy") for r in runs}
    points = []
    for run in runs:
        size = records_per_class(run)
        if size is None:
            continue
        label = mechanism_label(run)
        if len(strategies) > 1:
            label = f"{run.metrics.get('strategy')}: {label}"
        points.append(SizePoint(label, size, run.metrics.get("seed"), audit_summary(run),
                                run.metrics["utility"]["probe_accuracy"]))
    return points if len({p.records_per_class for p in points}) > 1 else None


def _panel(ax, lines: dict, value, ci=None) -> None:
    """One line per mechanism through the mean over seeds at each size; every seed a point (with its CI)."""
    for i, (label, pts) in enumerate(lines.items()):
        pts = [p for p in pts if value(p) is not None]
        if not pts:
            continue
        color = f"C{i % 10}"
        xs = np.array([p.records_per_class for p in pts])
        ys = np.array([value(p) for p in pts])
        if ci is not None:
            lo_hi = np.array([ci(p) for p in pts])
            ax.errorbar(xs, ys, yerr=[ys - lo_hi[:, 0], lo_hi[:, 1] - ys], fmt="o", ms=3, color=color, alpha=0.5,
                        lw=0.8)
        else:
            ax.scatter(xs, ys, s=12, color=color, alpha=0.5)
        sizes = np.unique(xs)
        ax.plot(sizes, [ys[xs == s].mean() for s in sizes], marker="o", color=color, label=label)
    ax.set_xscale("log")
    sizes = sorted({p.records_per_class for pts in lines.values() for p in pts})
    ax.set_xticks(sizes, [f"{s:.0f}" for s in sizes])  # the sizes run, not powers of ten
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training records per class (log scale)")


def _by_size(points: list[SizePoint], value) -> tuple[np.ndarray, np.ndarray]:
    """The largest of a per-run number at each size (the chance band, the canary ceiling)."""
    found = defaultdict(list)
    for p in points:
        if p.summary and value(p.summary) is not None:
            found[p.records_per_class].append(value(p.summary))
    sizes = np.array(sorted(found))
    return sizes, np.array([max(found[s]) for s in sizes])


def leakage_vs_size(runs: list[RunEvidence]) -> str | None:
    """The figure as a PNG data URI, or None when the runs do not differ in records per class."""
    fig = size_figure(runs)
    return None if fig is None else _uri(fig, layout=False)


def size_figure(runs: list[RunEvidence]):
    """The matplotlib figure (panels: AUC, TPR at 1% FPR, canary bound, probe accuracy), or None."""
    points = size_points(runs)
    if points is None:
        return None
    lines: dict[str, list[SizePoint]] = defaultdict(list)
    for p in sorted(points, key=lambda p: p.mechanism):
        lines[p.mechanism].append(p)
    audited = [p for p in points if p.summary]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    auc, tpr, canary, utility = axes.ravel()
    sizes, half = _by_size(audited, lambda s: (s.get("chance_band") or {}).get("auc_half_width"))
    if len(sizes):
        auc.fill_between(sizes, 0.5 - half, 0.5 + half, color="grey", alpha=0.2, label="chance band (largest per size)")
    auc.axhline(0.5, color="grey", lw=0.8, ls="--")
    _panel(auc, lines, lambda p: p.summary and p.summary["best_attack"]["auc"],
           lambda p: p.summary["best_attack"]["auc_ci"])
    auc.set_ylabel("best membership AUC (95% CI)")
    _panel(tpr, lines, lambda p: p.summary and p.summary["best_attack"]["tpr_at_1pct_fpr"],
           lambda p: p.summary["best_attack"]["tpr_at_1pct_fpr_ci"])
    tpr.set_ylabel("TPR at 1% FPR (95% CI)")
    sizes, ceiling = _by_size(audited, lambda s: (s.get("canary") or {}).get("epsilon_ceiling"))
    if len(sizes):
        canary.plot(sizes, ceiling, color="grey", ls="--", lw=1, label="the most this audit could have shown")
    _panel(canary, lines, lambda p: p.summary and p.summary["canary"] and p.summary["canary"]["epsilon_lb"])
    canary.set_ylabel("canary lower bound ε_lb (measured, not a guarantee)")
    if not canary.lines:
        canary.text(0.5, 0.5, "no run inserted canaries", transform=canary.transAxes, ha="center", fontsize=9)
    _panel(utility, lines, lambda p: p.probe_accuracy)
    utility.set_ylabel("probe accuracy")
    for ax in (auc, tpr):
        if not ax.lines:
            ax.text(0.5, 0.5, "no run was audited", transform=ax.transAxes, ha="center", fontsize=9)
    handles, labels = utility.get_legend_handles_labels()
    extra = [(h, lab) for ax in (auc, canary) for h, lab in zip(*ax.get_legend_handles_labels()) if lab not in labels]
    fig.legend(handles + [h for h, _ in extra], labels + [lab for _, lab in extra], loc="lower center", ncol=2,
               fontsize=8, frameon=False)
    rows = -(-(len(labels) + len(extra)) // 2)
    fig.tight_layout(rect=(0, 0.03 + 0.035 * rows, 1, 1))
    return fig
