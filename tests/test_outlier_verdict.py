"""The two outlier verdicts: memorisation (outliers against never-seen controls, rates and the distance
test), and the paper's claim that outliers are mapped to typical points, judged only where the
domain classifier is reliable on the same decoder's inlier reconstructions."""
import pytest
from scipy.stats import fisher_exact

from attacks.outlier_verdicts import (TYPICAL_MAPPING_RATE, memorisation_verdict, outlier_verdicts,
                                      typical_mapping_verdict)
from federation.errors import ConfigError


# ---------------------------------------------------------------- memorisation

def test_no_reconstruction_and_no_distance_signal_is_not_memorised():
    v = memorisation_verdict(0.0, 600, 0.0, 500, closer_p=0.53, alpha=0.05)
    assert v["verdict"] == "not memorised" and v["memorised"] is False
    assert "0.53" in v["reason"] and "0/600" in v["reason"] and "0/500" in v["reason"]


def test_no_reconstruction_but_outliers_fit_closer_is_memorised():
    # 0 of 600 against 0 of 500 says nothing; the trained-on outliers sitting closer than controls does
    v = memorisation_verdict(0.0, 600, 0.0, 500, closer_p=0.00023, alpha=0.05)
    assert v["verdict"] == "memorised" and v["memorised"] is True
    assert "0.00023" in v["reason"] and "Mann-Whitney" in v["reason"] and "Fisher" not in v["reason"]


def test_a_significantly_higher_rate_is_memorised_and_a_slightly_higher_one_is_not():
    v = memorisation_verdict(30 / 100, 100, 5 / 100, 100, closer_p=0.5, alpha=0.05)
    assert v["verdict"] == "memorised" and "Fisher" in v["reason"] and "Mann-Whitney" not in v["reason"]
    assert v["rate_p_value"] == pytest.approx(fisher_exact([[30, 70], [5, 95]], alternative="greater").pvalue)
    v = memorisation_verdict(2 / 100, 100, 1 / 100, 100, closer_p=0.5, alpha=0.05)
    assert v["verdict"] == "not memorised" and v["rate_p_value"] >= 0.05


def test_the_rate_counts_are_over_each_group():
    # 3 of 10 outliers against 3 of 1000 controls is significant; the same rate over 10 controls is not
    v = memorisation_verdict(0.3, 10, 0.003, 1000, closer_p=0.5, alpha=0.05)
    assert v["memorised"] is True and v["rate_p_value"] < 0.025
    assert memorisation_verdict(0.3, 10, 0.3, 10, closer_p=0.5, alpha=0.05)["memorised"] is False


def test_each_memorisation_test_runs_at_half_alpha():
    # two tests, one verdict: p = 0.03 would pass a single test at 0.05 but not either test at 0.025
    v = memorisation_verdict(0.0, 600, 0.0, 500, closer_p=0.03, alpha=0.05)
    assert v["verdict"] == "not memorised" and v["per_test_alpha"] == 0.025
    assert memorisation_verdict(0.0, 600, 0.0, 500, closer_p=0.02, alpha=0.05)["verdict"] == "memorised"


# ---------------------------------------------------------------- the paper's claim

def test_the_claim_holds_when_the_classifier_is_reliable_and_outliers_are_mapped_to_typical():
    v = typical_mapping_verdict(0.95, 600, 1.0, 200)
    assert v["verdict"] == "holds" and v["holds"] is True and v["required_rate"] == TYPICAL_MAPPING_RATE == 0.9
    assert "0.950" in v["reason"] and "1.000" in v["reason"]


def test_the_claim_fails_when_the_classifier_is_reliable_but_outliers_are_not_mapped():
    # the decoder-only DP benchmark run: inliers 0.995 recognised as typical, outliers 0.152
    v = typical_mapping_verdict(0.152, 600, 0.995, 200)
    assert v["verdict"] == "fails" and v["holds"] is False
    assert "0.152" in v["reason"] and "0.995" in v["reason"]


@pytest.mark.parametrize("inliers", [0.58, 0.0, 0.899])
def test_the_claim_cannot_be_judged_when_the_classifier_misreads_the_inliers(inliers):
    # outliers 0.000 mapped while the inliers are only 0.58 or 0.00 mapped: no verdict on the claim
    v = typical_mapping_verdict(0.0, 600, inliers, 200)
    assert v["verdict"] == "cannot judge" and v["holds"] is None
    assert f"{inliers:.3f}" in v["reason"] and "0.9" in v["reason"]
    # whatever the outliers do: an unreliable classifier judges neither way
    assert typical_mapping_verdict(1.0, 600, inliers, 200)["verdict"] == "cannot judge"


def test_the_reliability_bar_is_inclusive_and_configurable():
    assert typical_mapping_verdict(0.9, 600, 0.9, 200)["verdict"] == "holds"
    assert typical_mapping_verdict(0.7, 600, 0.8, 200, required_rate=0.75)["verdict"] == "fails"
    assert typical_mapping_verdict(0.7, 600, 0.8, 200, required_rate=0.85)["verdict"] == "cannot judge"


def test_no_inliers_cannot_judge():
    v = typical_mapping_verdict(0.0, 600, None, 0)
    assert v["verdict"] == "cannot judge" and "no inlier" in v["reason"]


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, True, "0.9"])
def test_a_required_rate_outside_the_unit_interval_is_one_line(bad):
    with pytest.raises(ConfigError, match=r"^audit\.typical_mapping_rate must be in \(0, 1\], got") as err:
        typical_mapping_verdict(0.5, 10, 0.95, 10, required_rate=bad)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- both, from reconstruct_groups' summary

def _groups(outliers_mapped, inliers_mapped, closer_p, controls=True):
    groups = {"outliers": {"n": 600, "reconstruction_rate": 0.0, "mapped_to_typical": outliers_mapped},
              "inliers": {"n": 200, "reconstruction_rate": 0.0, "mapped_to_typical": inliers_mapped}}
    if controls:
        groups["controls"] = {"n": 500, "reconstruction_rate": 0.0, "mapped_to_typical": 0.0}
        groups["comparison"] = {"reconstruction_rate": 0.0, "control_rate": 0.0, "outliers_closer_p_value": closer_p}
    return groups


def test_both_verdicts_are_judged_separately():
    # the case the single verdict got wrong: no memorisation signal, outliers not mapped, and a classifier
    # that recognises only 0.58 of the inliers' reconstructions: "not memorised" and "cannot judge"
    v = outlier_verdicts(_groups(0.0, 0.58, 0.6), alpha=0.05)
    assert v["memorisation"]["verdict"] == "not memorised" and v["typical_mapping"]["verdict"] == "cannot judge"
    v = outlier_verdicts(_groups(0.0, 1.0, 0.00023), alpha=0.05)
    assert v["memorisation"]["verdict"] == "memorised" and v["typical_mapping"]["verdict"] == "fails"
    v = outlier_verdicts(_groups(1.0, 1.0, 0.53), alpha=0.05, required_rate=0.95)
    assert v["memorisation"]["verdict"] == "not memorised" and v["typical_mapping"]["verdict"] == "holds"
    assert v["typical_mapping"]["required_rate"] == 0.95


def test_without_controls_memorisation_is_not_tested_but_the_claim_is_judged():
    v = outlier_verdicts(_groups(0.95, 0.97, None, controls=False), alpha=0.05)
    assert v["memorisation"]["verdict"] == "not tested" and "no controls" in v["memorisation"]["reason"]
    assert v["typical_mapping"]["verdict"] == "holds"
