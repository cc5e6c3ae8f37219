"""Outlier reconstruction: can the shared decoder of the client that held cross-domain outliers
reproduce them, better than it reproduces never-seen items of the same source (controls)?

For every record the best latent-fit reconstruction x^ is found. Reported per group (outliers,
controls, inliers):

* ``distance``: ||x - x^||_2;
* ``normalized``: a Carlini et al. (2023) style normalized distance,
  ||x - x^||_2 / mean_{y in N_k(x^)} ||x^ - y||_2, with N_k(x^) the k nearest public records to x^
  (the caller passes both datasets' public test splits). Below 1, x^ is closer to its record than to
  public data; a record counts as **reconstructed** when it is below ``threshold``;
* ``mapped_to_typical``: the fraction of reconstructions a domain classifier (main dataset vs outlier
  source, fitted on public test splits) assigns to the main dataset.

The comparison of outliers with controls reports both rates and a one-sided Mann-Whitney test that
outliers sit closer to their reconstructions; ``attacks/outlier_verdicts.py`` turns these into a
memorisation verdict and a verdict on the paper's claim that outliers are mapped to typical points.
The normalized distances' percentiles are reported per group, since a fixed threshold may be reached
by no record at all.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy.stats import mannwhitneyu
from sklearn.linear_model import LogisticRegression
from torch import nn

from attacks.latent_fit import LatentFit, _pairwise_sq, fit_latents


def domain_classifier(main_public: torch.Tensor, outlier_public: torch.Tensor, seed: int) -> LogisticRegression:
    """Logistic regression on pixels: 1 = main dataset, 0 = outlier source."""
    x = torch.cat([main_public.flatten(1), outlier_public.flatten(1)]).numpy()
    y = np.r_[np.ones(len(main_public), int), np.zeros(len(outlier_public), int)]
    return LogisticRegression(max_iter=500, random_state=seed).fit(x, y)


def normalized_distance(fit: LatentFit, typical: torch.Tensor, k: int) -> torch.Tensor:
    near = _pairwise_sq(fit.reconstructions, typical.flatten(1).float()).sqrt_()
    scale = near.topk(min(k, near.shape[1]), dim=1, largest=False).values.mean(1)
    return fit.distance / scale.clamp_min(1e-12)


def reconstruct_groups(decoder: nn.Module | None, latent_dim: int, groups: dict[str, torch.Tensor],
                       typical: torch.Tensor, classifier: LogisticRegression, generator: torch.Generator, *,
                       threshold: float, k: int = 50, fit_options: dict | None = None,
                       fitter: Callable[[str, torch.Tensor], LatentFit] | None = None) -> tuple[dict, dict]:
    """Returns (summary per group, reconstructions per group for image grids). ``fitter(group, records)``
    replaces the latent fit on ``decoder`` (e.g. class-conditional decoders, each record fitted by its class's)."""
    summary, recons = {}, {}
    for name, records in groups.items():
        if not len(records):
            continue
        if fitter is not None:
            fit = fitter(name, records)
        else:
            fit = fit_latents(decoder, records, latent_dim, generator, **(fit_options or {}))
        norm = normalized_distance(fit, typical, k)
        to_main = classifier.predict(fit.reconstructions.numpy())
        summary[name] = {
            "n": int(len(records)),
            "distance": _describe(fit.distance.numpy()),
            "normalized": _describe(norm.numpy()),
            "reconstruction_rate": float((norm < threshold).float().mean()),
            "mapped_to_typical": float(to_main.mean()),
            "distances": fit.distance.numpy().round(5).tolist(),
            "normalized_distances": norm.numpy().round(5).tolist(),
        }
        recons[name] = fit.reconstructions
    if "outliers" in summary and "controls" in summary:
        o, c = summary["outliers"], summary["controls"]
        test = mannwhitneyu(o["normalized_distances"], c["normalized_distances"], alternative="less")
        summary["comparison"] = {
            "reconstruction_rate": o["reconstruction_rate"], "control_rate": c["reconstruction_rate"],
            "outliers_closer_p_value": float(test.pvalue),
            "test": "one-sided Mann-Whitney U: outliers' normalized distances < controls'",
            "threshold": threshold, "neighbours": k}
    return summary, recons


def _describe(values: np.ndarray) -> dict:
    q = np.percentile(values, [5, 25, 50, 75, 95])
    return {"mean": float(values.mean()), "p05": float(q[0]), "p25": float(q[1]), "median": float(q[2]),
            "p75": float(q[3]), "p95": float(q[4])}
