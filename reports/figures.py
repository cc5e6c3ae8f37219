"""Matplotlib figures for the report, returned as PNG data URIs (the report embeds them)."""
from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from federation import run_layout as layout  # noqa: E402
from reports.evidence import RunEvidence  # noqa: E402
from reports.summary import audit_summary, headline_epsilon, shares_decoders  # noqa: E402


def _uri(fig, layout: bool = True) -> str:
    buf = io.BytesIO()
    if layout:
        fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def frontier(runs: list[RunEvidence]) -> str:
    """Probe accuracy against accountant epsilon (formal guarantees only) and against the best MIA AUC.
    One legend under both panels keeps the points clear; it says which runs have no place on the left."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    handles = []
    for i, run in enumerate(runs):
        acc = run.metrics["utility"]["probe_accuracy"]
        color = f"C{i % 10}"
        eps = headline_epsilon(run.metrics.get("privacy", {}))
        if eps is not None:
            left.scatter([eps], [acc], color=color)
        best = (audit_summary(run) or {}).get("best_attack")
        if best:
            right.errorbar([best["auc"]], [acc], xerr=[[best["auc"] - best["auc_ci"][0]],
                                                       [best["auc_ci"][1] - best["auc"]]], fmt="o", color=color)
        where = [] if eps is not None else ["no formal guarantee: not on the left"]
        if not best:
            where.append("not audited: not on the right" if shares_decoders(run)
                         else "shares no decoder: not on the right")
        label = run.label + (f" ({'; '.join(where)})" if where else "")
        handles.append(plt.Line2D([], [], marker="o", ls="", color=color, label=label))
    left.set_xscale("log")
    left.set_xlabel("accountant epsilon, headline relation (log scale)")
    left.set_ylabel("probe accuracy")
    left.set_title("utility vs formal privacy")
    if not left.collections:
        left.text(0.5, 0.5, "no run has a formal guarantee", transform=left.transAxes, ha="center", fontsize=9)
    right.axvline(0.5, color="grey", lw=0.8, ls="--")
    right.set_xlabel("best membership-inference AUC (95% CI)")
    right.set_ylabel("probe accuracy")
    right.set_title("utility vs measured leakage")
    if not right.containers:
        right.text(0.5, 0.5, "no run was audited", transform=right.transAxes, ha="center", fontsize=9)
    ncol = 2 if max(len(h.get_label()) for h in handles) <= 65 else 1  # long labels get the full width
    rows = -(-len(handles) // ncol)
    fig.set_size_inches(10, 4 + 0.2 * rows)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.2 * rows / (4 + 0.2 * rows) + 0.02, 1, 1))
    return _uri(fig, layout=False)


def roc(run: RunEvidence) -> str | None:
    if not run.audit:
        return None
    fig, (lin, log) = plt.subplots(1, 2, figsize=(10, 4))
    for name, m in run.audit["mia"].items():
        fpr, tpr = np.asarray(m["roc"]["fpr"]), np.asarray(m["roc"]["tpr"])
        for ax in (lin, log):
            ax.plot(fpr, tpr, label=f"{name} (AUC {m['auc']:.3f})", lw=1.2)
    floor = 1.0 / max(m["n_nonmembers"] for m in run.audit["mia"].values())
    for ax in (lin, log):
        ax.plot([floor, 1], [floor, 1], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("false positive rate (non-members)")
        ax.set_ylabel("true positive rate (members)")
    log.set_xscale("log")
    log.set_yscale("log")
    log.set_xlim(floor, 1)
    log.set_ylim(floor, 1)
    lin.set_title("ROC")
    log.set_title("ROC, log-log (low-FPR regime)")
    lin.legend(fontsize=7)
    return _uri(fig)


STATUS_COLORS = {"replied": "#2ca02c", "late-reply": "#bcbd22", "no-reply": "#ff7f0e", "busy": "#ffbb78",
                 "not-selected": "#d9d9d9", "left": "#7f7f7f", "budget-spent": "#9467bd", "rejected": "#d62728",
                 "failed": "#8c564b", "lost": "#e377c2"}


def rounds(run: RunEvidence) -> str | None:
    df = run.rounds
    if df is None or df.empty:
        return None
    status_cols = sorted((c for c in df.columns if layout.STATUS_COLUMN.match(c)),
                         key=lambda c: int(layout.STATUS_COLUMN.match(c).group(1)))
    fig, axes = plt.subplots(1, 3 if status_cols else 2, figsize=(15 if status_cols else 10, 3.5))
    left, right = axes[0], axes[1]
    for col in [c for c in df.columns if layout.LOSS_COLUMN.match(c)]:
        if df[col].notna().any():
            left.plot(df["round"], df[col], marker=".", label=col.replace("_loss", ""))
    left.set_xlabel("round")
    left.set_ylabel("last-epoch training loss")
    if left.lines:
        left.legend(fontsize=7)
    else:
        left.text(0.5, 0.5, "no loss was released", transform=left.transAxes, ha="center", fontsize=9)
    if "probe_accuracy" in df:
        right.plot(df["round"], df["probe_accuracy"], marker="o", label="probe accuracy")
        if "probe_f1" in df:
            right.plot(df["round"], df["probe_f1"], marker="s", label="probe F1")
        right.legend(fontsize=7)
    right.set_xlabel("round")
    right.set_title("global model per round")
    if status_cols:
        _status_matrix(axes[2], df, status_cols)
    return _uri(fig)


def _status_matrix(ax, df, columns: list[str]) -> None:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    names = list(STATUS_COLORS)
    codes = np.array([[names.index(v) if v in names else -1 for v in df[c].fillna("")] for c in columns], float)
    codes[codes < 0] = np.nan
    ax.imshow(codes, aspect="auto", cmap=ListedColormap(list(STATUS_COLORS.values())), vmin=0,
              vmax=len(names) - 1, interpolation="nearest")
    ax.set_yticks(range(len(columns)), [c.split("_")[0] for c in columns], fontsize=7)
    ax.set_xticks(range(len(df)), [str(r) for r in df["round"]], fontsize=7)
    ax.set_xlabel("round")
    ax.set_title("what each client did")
    present = [n for n in names if (df[columns] == n).any().any()]
    ax.legend(handles=[Patch(color=STATUS_COLORS[n], label=n) for n in present], fontsize=6,
              loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
