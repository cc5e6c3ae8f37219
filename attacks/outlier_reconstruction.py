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

The paper's claim, that a privacy mechanism maps sensitive outliers to typical points, holds when
the outliers' reconstruction rate is no higher than the controls' and a one-sided Mann-Whitney test
finds outliers no closer to their reconstructions than controls (both at ``alpha``); it fails when
the rate is significantly higher (one-sided Fisher exact test), and is inconclusive otherwise.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import fisher_exact, mannwhitneyu
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


def reconstruct_groups(decoder: nn.Module, latent_dim: int, groups: dict[str, torch.Tensor],
                       typical: torch.Tensor, classifier: LogisticRegression, generator: torch.Generator, *,
                       threshold: float, alpha: float = 0.05, k: int = 50,
                       fit_options: dict | None = None) -> tuple[dict, dict]:
    """Returns (summary per group, reconstructions per group for image grids)."""
    summary, recons = {}, {}
    for name, records in groups.items():
        if not len(records):
            continue
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
        verdict, holds, rate_p = outlier_verdict(o["reconstruction_rate"], o["n"], c["reconstruction_rate"], c["n"],
                                                 float(test.pvalue), alpha)
        summary["comparison"] = {
            "reconstruction_rate": o["reconstruction_rate"], "control_rate": c["reconstruction_rate"],
            "claim_holds": holds, "verdict": verdict, "rate_p_value": float(rate_p),
            "outliers_closer_p_value": float(test.pvalue),
            "test": "one-sided Mann-Whitney U: outliers' normalized distances < controls'",
            "threshold": threshold, "neighbours": k}
    return summary, recons


def outlier_verdict(outlier_rate: float, n_outliers: int, control_rate: float, n_controls: int,
                    closer_p: float, alpha: float) -> tuple[str, bool | None, float]:
    """(verdict, claim_holds, Fisher p) for the mapping claim, from the two reconstruction rates and the
    distance test's p-value. A rate no higher than the controls' is not enough on its own: when the
    outliers still sit significantly closer to their reconstructions than the controls do, the decoder
    fits what it trained on below the threshold, and the claim is left inconclusive."""
    hits_o, hits_c = round(outlier_rate * n_outliers), round(control_rate * n_controls)
    rate_p = float(fisher_exact([[hits_o, n_outliers - hits_o], [hits_c, n_controls - hits_c]],
                                alternative="greater").pvalue)
    if outlier_rate <= control_rate and closer_p >= alpha:
        return ("holds: outliers are reconstructed no more often than never-seen controls, and sit no closer to "
                f"their reconstructions (one-sided Mann-Whitney p = {closer_p:.3g} >= {alpha})"), True, rate_p
    if outlier_rate <= control_rate:
        return ("inconclusive: outliers are reconstructed no more often than never-seen controls, but sit closer "
                f"to their reconstructions (one-sided Mann-Whitney p = {closer_p:.3g} < {alpha})"), None, rate_p
    if rate_p < alpha:
        return ("fails: outliers are reconstructed more often than controls (one-sided Fisher exact "
                f"p = {rate_p:.3g} < {alpha})"), False, rate_p
    return ("inconclusive: the outliers' rate is higher but not significantly (one-sided Fisher exact "
            f"p = {rate_p:.3g} >= {alpha})"), None, rate_p


def _describe(values: np.ndarray) -> dict:
    q = np.percentile(values, [5, 25, 50, 75, 95])
    return {"mean": float(values.mean()), "p05": float(q[0]), "p25": float(q[1]), "median": float(q[2]),
            "p75": float(q[3]), "p95": float(q[4])}
