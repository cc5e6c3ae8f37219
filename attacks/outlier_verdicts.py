"""Two verdicts on the outlier client's reconstructions, each saying what it measures.

* **Memorisation**: did the decoder memorise the outliers it trained on? Outliers are compared with
  never-seen items of the same source (controls) by two one-sided tests: a Fisher exact test that
  outliers are reconstructed more often, and a Mann-Whitney test that outliers sit closer to their
  reconstructions (normalised distances). Each is run at ``alpha / 2`` (Bonferroni), so a decoder
  that memorised nothing is called "memorised" with probability at most ``alpha``. "not memorised"
  means neither test found a difference: the absence of evidence at these tests' power.
* **Typical mapping**: the paper's claim that outliers are mapped to typical points (of the main
  dataset), read from a domain classifier. It is judged only where that classifier is reliable on
  the same decoder's reconstructions of its own training records (inliers): at least
  ``required_rate`` of them must be classified typical, else the verdict is "cannot judge". When
  judged, the claim holds when at least ``required_rate`` of the outliers' reconstructions are
  classified typical too, and fails otherwise.
"""
from __future__ import annotations

from federation.errors import ConfigError

TYPICAL_MAPPING_RATE = 0.9  # default of audit.typical_mapping_rate


def check_rate(value: float, name: str = "audit.typical_mapping_rate") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def memorisation_verdict(outlier_rate: float, n_outliers: int, control_rate: float, n_controls: int,
                         closer_p: float, alpha: float) -> dict:
    """From the two groups' reconstruction rates (at the normalised-distance threshold) and the
    one-sided Mann-Whitney p-value that outliers sit closer to their reconstructions than controls."""
    from scipy.stats import fisher_exact

    if not 0 < alpha < 1:
        raise ConfigError(f"audit.alpha must be in (0, 1), got {alpha!r}")
    hits_o, hits_c = round(outlier_rate * n_outliers), round(control_rate * n_controls)
    rate_p = float(fisher_exact([[hits_o, n_outliers - hits_o], [hits_c, n_controls - hits_c]],
                                alternative="greater").pvalue)
    level = alpha / 2
    found = []
    if rate_p < level:
        found.append(f"reconstructed more often ({hits_o}/{n_outliers} against {hits_c}/{n_controls}, one-sided "
                     f"Fisher exact p = {rate_p:.3g} < {level:g})")
    if closer_p < level:
        found.append(f"sit closer to their reconstructions (one-sided Mann-Whitney p = {closer_p:.3g} < {level:g})")
    if found:
        verdict, memorised = "memorised", True
        reason = "outliers, against never-seen controls of the same source, " + " and ".join(found)
    else:
        verdict, memorised = "not memorised", False
        reason = (f"outliers are reconstructed no more often ({hits_o}/{n_outliers} against {hits_c}/{n_controls}, "
                  f"one-sided Fisher exact p = {rate_p:.3g} >= {level:g}) and sit no closer to their "
                  f"reconstructions (one-sided Mann-Whitney p = {closer_p:.3g} >= {level:g}) than never-seen "
                  "controls; a stronger attack may still find a difference")
    return {"verdict": verdict, "memorised": memorised, "reason": reason, "rate_p_value": rate_p,
            "closer_p_value": float(closer_p), "alpha": alpha, "per_test_alpha": level}


def typical_mapping_verdict(outliers_mapped: float, n_outliers: int, inliers_mapped: float | None, n_inliers: int,
                            required_rate: float = TYPICAL_MAPPING_RATE) -> dict:
    """From the fractions of the outliers' and the inliers' reconstructions the domain classifier
    assigns to the main dataset."""
    required_rate = check_rate(required_rate)
    out = {"outliers_mapped_to_typical": outliers_mapped, "inliers_mapped_to_typical": inliers_mapped,
           "n_outliers": n_outliers, "n_inliers": n_inliers, "required_rate": required_rate}
    if inliers_mapped is None or not n_inliers:
        return {"verdict": "cannot judge", "holds": None, **out,
                "reason": "no inlier was reconstructed, so the domain classifier's reliability on this decoder "
                          "is unknown"}
    if inliers_mapped < required_rate:
        return {"verdict": "cannot judge", "holds": None, **out,
                "reason": f"the domain classifier maps only {inliers_mapped:.3f} of the decoder's reconstructions of "
                          f"its own training records (inliers, n = {n_inliers}) to typical points, below the "
                          f"{required_rate:g} required to trust it on this decoder's output"}
    reliable = (f"the domain classifier maps {inliers_mapped:.3f} of the inliers' reconstructions (n = {n_inliers}) "
                f"to typical points (>= {required_rate:g})")
    if outliers_mapped >= required_rate:
        return {"verdict": "holds", "holds": True, **out,
                "reason": f"{outliers_mapped:.3f} of the outliers' reconstructions (n = {n_outliers}) are mapped to "
                          f"typical points (>= {required_rate:g}), and {reliable}"}
    return {"verdict": "fails", "holds": False, **out,
            "reason": f"only {outliers_mapped:.3f} of the outliers' reconstructions (n = {n_outliers}) are mapped to "
                      f"typical points (< {required_rate:g}), while {reliable}"}


def outlier_verdicts(groups: dict, alpha: float, required_rate: float = TYPICAL_MAPPING_RATE) -> dict:
    """Both verdicts from ``reconstruct_groups``' summary (groups outliers, controls, inliers, and the
    outliers-against-controls comparison)."""
    o, inl = groups["outliers"], groups.get("inliers")
    comparison = groups.get("comparison")
    if comparison is None:
        memorisation = {"verdict": "not tested", "memorised": None,
                        "reason": "no controls (partition.outliers.holdout: 0): nothing never-seen to compare with"}
    else:
        memorisation = memorisation_verdict(o["reconstruction_rate"], o["n"], comparison["control_rate"],
                                            groups["controls"]["n"], comparison["outliers_closer_p_value"], alpha)
    typical = typical_mapping_verdict(o["mapped_to_typical"], o["n"], inl["mapped_to_typical"] if inl else None,
                                      inl["n"] if inl else 0, required_rate)
    return {"memorisation": memorisation, "typical_mapping": typical}
