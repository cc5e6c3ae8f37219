"""What an audit could have seen (attacks.sensitivity): the membership game's AUC half-width at its size."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from attacks.sensitivity import auc_half_width, audit_sensitivity
from federation.errors import ConfigError


def test_half_width_is_hanley_mcneil_at_auc_one_half():
    # (n1 + n2 + 1) / (12 n1 n2) is Hanley and McNeil's variance at A = 0.5 (Q1 = Q2 = 1/3)
    for n1, n0 in ((2500, 2500), (30, 90), (1, 1)):
        a, q = 0.5, 1 / 3
        var = (a * (1 - a) + (n1 - 1) * (q - a * a) + (n0 - 1) * (q - a * a)) / (n1 * n0)
        assert auc_half_width(n1, n0) == pytest.approx(1.959963985 * math.sqrt(var), rel=1e-9)
    assert auc_half_width(2500, 2500) == pytest.approx(0.0160, abs=5e-5)
    assert auc_half_width(100, 100, 0.99) > auc_half_width(100, 100, 0.95) > auc_half_width(400, 400, 0.95)


def test_half_width_covers_chance_auc_at_its_confidence():
    rng = np.random.default_rng(0)
    n, trials = 60, 2000
    labels = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    aucs = np.array([roc_auc_score(labels, rng.normal(size=2 * n)) for _ in range(trials)])
    outside = np.mean(np.abs(aucs - 0.5) > auc_half_width(n, n, 0.95))
    assert 0.03 < outside < 0.07  # about 5% of chance AUCs fall outside the band


@pytest.mark.parametrize("args, message", [((0, 5), "n_members"), ((5, 2.5), "n_nonmembers"),
                                           ((5, 5, 1.0), "confidence"), ((True, 5), "n_members")])
def test_bad_input_is_one_line(args, message):
    with pytest.raises(ConfigError, match=message) as err:
        auc_half_width(*args)
    assert "\n" not in str(err.value)


def test_audit_block_reads_the_sizes_and_ceilings():
    mia = {"a": {"auc": 0.6, "auc_ci": [0.55, 0.65], "n_members": 100, "n_nonmembers": 100,
                 "clients": {"0": {"n_members": 40, "n_nonmembers": 40}, "1": {"n_members": 60, "n_nonmembers": 60}}},
           "b": {"auc": 0.7, "auc_ci": [0.6, 0.8], "n_members": 100, "n_nonmembers": 100, "clients": {}}}
    cp = {"per_attack": {"a": {"epsilon_ceiling": 3.0}, "b": {"epsilon_ceiling": 3.0}}}
    canaries = {"m": 100, "r": 40, "delta": 1e-5, "beta": 0.05, "epsilon_ceiling": 2.55, "epsilon_lb": 1.0}
    block = audit_sensitivity(mia, cp, canaries, 0.05)
    g = block["membership_game"]
    assert g["auc_half_width"] == auc_half_width(100, 100) and g["confidence"] == 0.95
    assert g["clients"]["0"]["auc_half_width"] == auc_half_width(40, 40)
    assert g["best_attack"] == "b" and g["best_attack_bootstrap_half_width"] == pytest.approx(0.1)
    assert block["membership_estimate_ceiling"] == 3.0 and block["canaries"]["epsilon_ceiling"] == 2.55
    assert block["canary_note"] is None
    none = audit_sensitivity(mia, cp, None, 0.05)
    assert none["canaries"] is None and "no canaries" in none["canary_note"]
