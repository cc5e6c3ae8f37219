"""The FedHypeVAE comparison sweep: every run is a valid config, the grid is the FedHypeVAE issue's (ALIGN-FL and
FedHypeVAE each No-DP and at DP-SGD epsilon 1 and 10, FedAvg, seeds 0 and 1), all on one data set, partition and
recipe, and every DP-SGD plan can be met before anything trains."""
from __future__ import annotations

from pathlib import Path

from alignfl_audit.orchestrate import dp_plan
from alignfl_audit.sweep import _configs, load_sweep
from federation.training import TrainSettings

SWEEP = Path(__file__).resolve().parents[1] / "configs" / "sweep-fedhypevae-vs-alignfl.yaml"
MNIST_SMALLEST_CLASS = 5421  # MNIST's training images of digit 5


def _grid():
    return _configs(load_sweep(SWEEP), {})  # a bad entry raises ConfigError


def test_the_grid_is_the_issue_s_comparison_on_one_federation():
    cells: dict[tuple, list[int]] = {}
    same = set()
    for tag, cfg in _grid():
        p = cfg.privacy
        cells.setdefault((cfg.strategy.name, p.mechanism, p.target_epsilon if p.is_dp else None), []).append(cfg.seed)
        if p.is_dp:
            assert p.delta == 1e-5 and p.formal_guarantee() and p.scope == "full", tag
        else:
            assert not p.formal_guarantee(), tag
        part, t = cfg.partition, cfg.training
        same.add((cfg.data.dataset, str(part.client_classes), part.samples_per_class, part.holdout_per_class,
                  part.outliers.count, part.canaries.count, tuple(cfg.model["hidden"]), cfg.model["latent_dim"],
                  t.rounds, t.local_epochs, t.batch_size, cfg.audit.enabled))
    assert cells == {(s, m, e): [0, 1] for s in ("alignfl", "fedhypevae")
                     for m, e in (("none", None), ("dp-sgd", 1.0), ("dp-sgd", 10.0))} | {("fedavg", "none", None): [0, 1]}
    assert same == {("mnist", "[[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]", 6000, 500, 600, 1000, (512, 256, 128), 2,
                     10, 10, 128, True)}


def test_every_dp_sgd_plan_can_be_met():
    """Planned as the run plans it, for the smallest client (2 classes of MNIST's smallest size)."""
    planned = set()
    for tag, cfg in _grid():
        if not cfg.privacy.is_dp:
            continue
        per_class = min(cfg.partition.samples_per_class, MNIST_SMALLEST_CLASS - cfg.partition.holdout_per_class)
        t = cfg.training
        plan = dp_plan(cfg, 1, 2 * per_class, TrainSettings(t.rounds, t.local_epochs, t.batch_size))
        assert plan.noise_multiplier > 0, tag
        planned.add((cfg.strategy.name, cfg.privacy.target_epsilon))
    assert planned == {("alignfl", 1.0), ("alignfl", 10.0), ("fedhypevae", 1.0), ("fedhypevae", 10.0)}
