"""The outlier-mapping verdict: rates alone, and the distance test beside them."""
import pytest
from scipy.stats import fisher_exact

from attacks.outlier_reconstruction import outlier_verdict


def test_no_reconstruction_and_no_distance_signal_holds():
    verdict, holds, _ = outlier_verdict(0.0, 600, 0.0, 500, closer_p=0.53, alpha=0.05)
    assert holds is True and verdict.startswith("holds:")


def test_no_reconstruction_but_outliers_fit_closer_is_inconclusive():
    # 0 of 600 against 0 of 500 says nothing when the trained-on outliers still sit closer than controls
    verdict, holds, _ = outlier_verdict(0.0, 600, 0.0, 500, closer_p=0.00023, alpha=0.05)
    assert holds is None and verdict.startswith("inconclusive:") and "0.00023" in verdict


def test_a_significantly_higher_rate_fails_and_a_slightly_higher_one_is_inconclusive():
    verdict, holds, p = outlier_verdict(30 / 100, 100, 5 / 100, 100, closer_p=0.001, alpha=0.05)
    assert holds is False and verdict.startswith("fails:")
    assert p == pytest.approx(fisher_exact([[30, 70], [5, 95]], alternative="greater").pvalue)
    verdict, holds, p = outlier_verdict(2 / 100, 100, 1 / 100, 100, closer_p=0.5, alpha=0.05)
    assert holds is None and verdict.startswith("inconclusive:") and p >= 0.05


def test_the_rate_counts_are_over_each_group():
    # 3 of 10 outliers against 3 of 1000 controls is significant; the same rate over 10 controls is not
    _, holds, p = outlier_verdict(0.3, 10, 0.003, 1000, closer_p=0.5, alpha=0.05)
    assert holds is False and p < 0.05
    _, holds, _ = outlier_verdict(0.3, 10, 0.3, 10, closer_p=0.5, alpha=0.05)
    assert holds is True
