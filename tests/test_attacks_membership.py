"""Membership inference against a single decoder: the attacks separate members of an overfit decoder,
and do no better than chance on a decoder that never saw any candidate; the metrics count rates
over the right denominators."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attacks.membership import (LatentFitAttack, MonteCarloAttack, NearestSampleAttack, ReferenceCalibrated,
                                membership_game)
from attacks.mia_metrics import membership_metrics, point_metrics
from federation.rng import seeded_generator
from federation.data.sources import load_split, resolve_source
from federation.models import VAE
from federation.training import to_tensor, train_epochs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SPEC = {"arch": "mlp", "latent_dim": 2, "hidden": [256, 128]}


@pytest.fixture(scope="module")
def digits():
    """Embedded MNIST records of classes 0 and 1, shuffled with a fixed seed."""
    split = load_split(resolve_source("mnist"), "mnist", "train")
    x, y = to_tensor(split.images), split.labels
    ids = np.random.default_rng(0).permutation(np.flatnonzero(y < 2))
    return x, ids


def _decoder(data: torch.Tensor, epochs: int, seed: int = 0):
    vae = VAE(SPEC, torch.Generator().manual_seed(seed))
    train_epochs(vae, torch.optim.Adam(vae.parameters(), lr=2e-3), data, epochs, 32, 1.0,
                 torch.Generator().manual_seed(seed))
    return vae.decoder.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def overfit(digits):
    """32 records, 400 epochs: a decoder that has memorized its training set."""
    x, ids = digits
    return _decoder(x[ids[:32]], 400), x[ids[:32]], x[ids[32:64]]


def _auc(attack, decoder, members, nonmembers) -> float:
    scores = attack.fit(decoder, 2, seeded_generator(1)).score(torch.cat([members, nonmembers]))
    return point_metrics(scores, np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)])["auc"]


def test_white_box_latent_fit_separates_members_of_an_overfit_decoder(overfit):
    decoder, members, nonmembers = overfit
    assert _auc(LatentFitAttack(), decoder, members, nonmembers) > 0.9


@pytest.mark.parametrize("attack", [MonteCarloAttack(2000), NearestSampleAttack(2000)], ids=lambda a: a.name)
def test_black_box_attacks_beat_chance_on_an_overfit_decoder(overfit, attack):
    decoder, members, nonmembers = overfit
    assert _auc(attack, decoder, members, nonmembers) > 0.75


def test_attacks_are_at_chance_on_a_decoder_that_never_saw_the_candidates(digits):
    x, ids = digits
    decoder = _decoder(x[ids[:200]], 30)
    members, nonmembers = x[ids[200:400]], x[ids[400:600]]  # neither group was trained on
    for attack in (LatentFitAttack(), NearestSampleAttack(2000)):
        assert 0.4 <= _auc(attack, decoder, members, nonmembers) <= 0.6, attack.name


def test_calibration_subtracts_the_reference_score(overfit):
    decoder, members, nonmembers = overfit
    records = torch.cat([members, nonmembers])
    reference = _decoder(nonmembers, 50, seed=3)
    calibrated = ReferenceCalibrated(NearestSampleAttack, reference).fit(decoder, 2, seeded_generator(1))
    g = seeded_generator(1)  # the wrapper fits target then reference from one generator
    target = NearestSampleAttack().fit(decoder, 2, g).score(records)
    ref = NearestSampleAttack().fit(reference, 2, g).score(records)
    assert calibrated.name == "nearest_generated_sample_calibrated"
    np.testing.assert_allclose(calibrated.score(records), target - ref)


def test_scores_are_deterministic_under_a_seed(overfit):
    decoder, members, _ = overfit
    a = LatentFitAttack(steps=20).fit(decoder, 2, seeded_generator(5)).score(members)
    b = LatentFitAttack(steps=20).fit(decoder, 2, seeded_generator(5)).score(members)
    np.testing.assert_array_equal(a, b)


def test_membership_game_is_balanced_and_draws_from_the_right_pools():
    record = {"client": 2, "train_ids": list(range(100, 400)), "holdout_ids": list(range(1000, 1040))}
    labels = np.zeros(2000, np.int64)  # one class: the game is limited by the held-out pool
    game = membership_game(record, 50, seed=0, labels=labels)
    assert len(game.member_ids) == len(game.nonmember_ids) == 40  # limited by the held-out pool
    assert game.shrunk == {0: {"drawn": 50, "holdout": 40, "kept": 40}}
    assert set(game.member_ids) <= set(record["train_ids"])
    assert set(game.nonmember_ids) <= set(record["holdout_ids"])
    assert game.labels.sum() == 40 and (~game.labels).sum() == 40
    again = membership_game(record, 50, seed=0, labels=labels)
    np.testing.assert_array_equal(game.ids, again.ids)


def _imbalanced_client(hold_per_class: dict[int, int]):
    """A client whose training pool is 75% class 1 (300 records) and 25% class 0 (100), with held-out
    records per class as given; ids are laid out so that each id's class is known from the labels."""
    labels = np.full(3000, -1, np.int64)
    train = np.r_[np.arange(0, 100), np.arange(100, 400)]
    labels[:100], labels[100:400] = 0, 1
    hold, start = [], 1000
    for c, n in hold_per_class.items():
        labels[start:start + n] = c
        hold.append(np.arange(start, start + n))
        start += n
    train_extra = np.arange(2500, 2500 + 40)  # 40 training records of class 2, if a test asks for them
    labels[train_extra] = 2
    return labels, train, np.concatenate(hold), train_extra


def test_non_members_have_the_members_class_counts_on_an_imbalanced_pool():
    # uniform non-members from the held-out pool (200 of each class) would be about half 1s, while the
    # members are about 75% 1s: the per-class counts below would differ
    labels, train, hold, _ = _imbalanced_client({0: 200, 1: 200})
    record = {"client": 0, "train_ids": train.tolist(), "holdout_ids": hold.tolist()}
    game = membership_game(record, 120, seed=3, labels=labels)
    members = np.bincount(labels[game.member_ids], minlength=2)
    nonmembers = np.bincount(labels[game.nonmember_ids], minlength=2)
    np.testing.assert_array_equal(members, nonmembers)
    assert members.sum() == 120 and members[1] > 2 * members[0]  # the members follow the imbalanced pool
    assert game.member_counts == game.nonmember_counts == {0: int(members[0]), 1: int(members[1])}
    assert game.shrunk == {}
    assert set(game.member_ids) <= set(train) and set(game.nonmember_ids) <= set(hold)
    assert game.to_json()["members_per_class"] == {"0": int(members[0]), "1": int(members[1])}


def test_a_class_with_too_few_held_out_records_has_its_members_cut_to_match():
    labels, train, hold, extra = _imbalanced_client({0: 200, 1: 10})
    record = {"client": 0, "train_ids": np.r_[train, extra].tolist(), "holdout_ids": hold.tolist()}
    game = membership_game(record, 500, seed=1, labels=labels)  # all 440 training records drawn
    members = np.bincount(labels[game.member_ids], minlength=3)
    nonmembers = np.bincount(labels[game.nonmember_ids], minlength=3)
    np.testing.assert_array_equal(members, nonmembers)
    np.testing.assert_array_equal(members, [100, 10, 0])  # class 0 complete; class 1 cut; class 2 has no holdout
    assert game.shrunk == {1: {"drawn": 300, "holdout": 10, "kept": 10}, 2: {"drawn": 40, "holdout": 0, "kept": 0}}
    assert game.to_json()["shrunk_classes"]["1"] == {"drawn": 300, "holdout": 10, "kept": 10}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=80), st.lists(st.integers(0, 3), max_size=80),
       st.integers(1, 100), st.integers(0, 2**16))
def test_membership_game_is_class_matched_for_any_pools(train_classes, hold_classes, size, seed):
    labels = np.r_[train_classes, hold_classes].astype(np.int64)
    train, hold = np.arange(len(train_classes)), len(train_classes) + np.arange(len(hold_classes))
    record = {"client": 1, "train_ids": train.tolist(), "holdout_ids": hold.tolist()}
    game = membership_game(record, size, seed, labels)
    members = np.bincount(labels[game.member_ids], minlength=4)
    np.testing.assert_array_equal(members, np.bincount(labels[game.nonmember_ids], minlength=4))
    assert len(set(game.member_ids)) == len(game.member_ids) <= size
    assert set(game.member_ids) <= set(train) and set(game.nonmember_ids) <= set(hold)
    held = np.bincount(labels[hold], minlength=4) if len(hold) else np.zeros(4, int)
    assert all(members[c] == min(v["drawn"], held[c]) for c, v in game.shrunk.items())
    assert all(members[c] <= held[c] for c in range(4))
    assert sum(members) + sum(v["drawn"] - v["kept"] for v in game.shrunk.values()) == min(size, len(train))


def test_rates_use_members_for_tpr_and_nonmembers_for_fpr():
    # 4 members, 10 non-members. At the threshold between 0.65 and 0.7: 3 of 4 members above (TPR 0.75),
    # 1 of 10 non-members above (FPR 0.1). A denominator mix-up would give other numbers.
    members = np.array([0.9, 0.8, 0.7, 0.1])
    nonmembers = np.array([0.65, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.12, 0.11, 0.95])
    scores = np.r_[members, nonmembers]
    labels = np.r_[np.ones(4, bool), np.zeros(10, bool)]
    m = point_metrics(scores, labels)
    assert m["tpr_at_10pct_fpr"] == pytest.approx(0.75)
    assert m["tpr_at_1pct_fpr"] == 0.0  # the top score is a non-member
    assert m["advantage"] == pytest.approx(0.75 - 0.1)
    full = membership_metrics(scores, labels, bootstrap=50, seed=0)
    assert full["n_members"] == 4 and full["n_nonmembers"] == 10 and full["fpr_resolution"] == 0.1
    lo, hi = full["auc_ci"]
    assert lo <= full["auc"] <= hi


def _one_resample_at_a_time(scores, labels, bootstrap, seed):
    """The bootstrap as sklearn computes it, one resample after another (the reference for the batched one)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    def metrics(s, lab):
        fpr, tpr, _ = roc_curve(lab, s, drop_intermediate=False)
        return {"auc": roc_auc_score(lab, s), "advantage": np.max(tpr - fpr),
                **{f"tpr_at_{lv * 100:g}pct_fpr".replace(".", "_"): tpr[fpr <= lv + 1e-12].max()
                   for lv in (0.001, 0.01, 0.1)}}

    rng = np.random.default_rng([seed, 0xB007])
    members, nonmembers = np.flatnonzero(labels), np.flatnonzero(~labels)
    draws = []
    for _ in range(bootstrap):
        idx = np.r_[rng.choice(members, len(members)), rng.choice(nonmembers, len(nonmembers))]
        draws.append(metrics(scores[idx], labels[idx]))
    point = metrics(scores, labels)
    return {**point, **{f"{k}_ci": [np.percentile([d[k] for d in draws], q) for q in (2.5, 97.5)] for k in point}}


@pytest.mark.parametrize("decimals", [None, 1], ids=["distinct", "ties"])
def test_the_batched_bootstrap_equals_sklearn_one_resample_at_a_time(decimals):
    rng = np.random.default_rng(3)
    scores = np.r_[rng.normal(0.4, 1, 70), rng.normal(0, 1, 130)]
    if decimals is not None:
        scores = np.round(scores, decimals)  # many tied scores across members and non-members
    labels = np.r_[np.ones(70, bool), np.zeros(130, bool)]
    got, want = membership_metrics(scores, labels, 40, seed=5), _one_resample_at_a_time(scores, labels, 40, 5)
    assert set(want) <= set(got)
    for key, value in want.items():
        # rates are the same divisions of the same counts; the AUC differs only by the trapezoids' rounding
        assert np.allclose(got[key], value, rtol=0, atol=1e-12), (key, got[key], value)
    assert got["auc_ci"][0] < got["auc"] < got["auc_ci"][1]


def test_metrics_refuse_scores_that_are_not_finite_or_a_single_group():
    with pytest.raises(ValueError, match="NaN"):
        point_metrics(np.array([0.1, np.nan, 0.3]), np.array([True, False, False]))
    with pytest.raises(ValueError, match="both"):
        point_metrics(np.array([0.1, 0.2]), np.array([True, True]))


def test_membership_scores_equal_each_attack_run_on_its_own(digits):
    """Sharing the target's latent fit and generated samples across attacks changes no score."""
    from attacks.membership import membership_scores

    x, ids = digits
    target = VAE(SPEC, torch.Generator().manual_seed(1)).decoder.eval().requires_grad_(False)
    reference = VAE(SPEC, torch.Generator().manual_seed(2)).decoder.eval().requires_grad_(False)
    records = x[ids[:24]]
    options = dict(lam=0.01, init=64, restarts=2, steps=4)
    got = membership_scores(target, 2, records, lambda: seeded_generator(7), latent_options=options, samples=300,
                            reference=reference)
    alone = {"white_box_latent_fit": LatentFitAttack(**options), "monte_carlo": MonteCarloAttack(300),
             "nearest_generated_sample": NearestSampleAttack(300),
             "white_box_latent_fit_calibrated": ReferenceCalibrated(lambda: LatentFitAttack(**options), reference),
             "monte_carlo_calibrated": ReferenceCalibrated(lambda: MonteCarloAttack(300), reference)}
    assert list(got) == list(alone)
    for name, attack in alone.items():
        want = attack.fit(target, 2, seeded_generator(7)).score(records)
        assert np.array_equal(got[name], want), name
    assert not np.array_equal(got["monte_carlo"], got["monte_carlo_calibrated"])  # the reference really counts
