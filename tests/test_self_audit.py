"""``alignfl-audit self-audit``: Dirac canaries through the real DP-SGD trainer catch a broken mechanism,
do not flag the sound one, and the test-only breakages cannot be reached from a config."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from alignfl_audit.cli import main
from alignfl_audit.config import load_config
from alignfl_audit.self_audit import SelfAuditRecipe, run_self_audit
from attacks.dirac_canaries import DiracCanaryVAE, canary_coordinates, canary_images
from conftest import tiny_config
from federation.errors import ConfigError
from federation.models import vae_loss_per_sample
from federation.privacy.dp_sgd import DPTrainer, make_plan
from federation.privacy.spec import PrivacySpec

# small enough for CI (a few seconds a run): 4000 canaries beside 500 records, 50 steps at q = 0.2
SMALL = SelfAuditRecipe(canaries=4000, records=500, epochs=10, model={"arch": "mlp", "latent_dim": 2, "hidden": [32]},
                        selection_repeats=3, repeats=3)


@pytest.fixture(scope="module")
def sound():
    return run_self_audit(2.0, 1e-5, SMALL)


def test_sound_mechanism_is_not_flagged(sound):
    assert sound["grad_sample_mode"] == "bk" and sound["clipping"] == "adaptive" and sound["fault"] is None
    assert sound["epsilon_lb"] <= sound["accountant_epsilon"] < sound["target_epsilon"]
    assert not sound["flagged"]
    # the released gradient on coordinates no record touches is the claimed noise, and an included
    # canary adds one clip bound in a fraction q of the steps
    assert sound["observed_noise_multiplier"] == pytest.approx(sound["gradient_noise_multiplier"], rel=0.02)
    assert sound["mean_reading_included"] == pytest.approx(sound["sampling_rate"], abs=0.05)
    assert abs(sound["mean_reading_excluded"]) < 0.05
    assert 0 <= sound["v"] <= sound["r"] < sound["m"]


@pytest.mark.parametrize("fault", ["noise-quartered", "unclipped"])
def test_broken_mechanism_is_caught(fault, sound):
    res = run_self_audit(2.0, 1e-5, SMALL, fault=fault)
    assert res["accountant_epsilon"] == sound["accountant_epsilon"]  # same claim, broken code
    # the canary game is add/remove (canaries are in or out, no count released): the broken code's proven
    # lower bound exceeds the add/remove epsilon it claims. (The target is a replace-one figure since sigma is
    # calibrated under replace-one, so it is not the game's relation.)
    assert res["epsilon_lb"] > res["accountant_epsilon"]
    assert res["flagged"]
    if fault == "noise-quartered":
        assert res["observed_noise_multiplier"] == pytest.approx(res["gradient_noise_multiplier"] / 4, rel=0.02)


def test_dirac_canary_gradient_is_one_probe_coordinate():
    m = 1000
    model = DiracCanaryVAE({"arch": "mlp", "latent_dim": 2, "hidden": [16]}, torch.Generator().manual_seed(0), m)
    model.norms = torch.linspace(0.5, 50.0, m)
    canary = 850  # row 1 of the probe, column 66
    x = torch.cat([canary_images(m)[canary:canary + 1], torch.rand(1, 1, 28, 28)])
    recon, mu, logvar = model(x, generator=torch.Generator().manual_seed(1))
    losses = vae_loss_per_sample(x, recon, mu, logvar, 1.0)
    params = dict(model.named_parameters())
    for i, loss in enumerate(losses):
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), retain_graph=True)))
        probe = grads.pop("probe.weight")
        others = torch.cat([g.flatten() for g in grads.values()])
        if i == 0:
            row, col = canary_coordinates(m)
            expected = torch.zeros_like(probe)
            expected[row[canary], col[canary]] = model.norms[canary]
            assert torch.allclose(probe, expected, rtol=1e-5, atol=0)
            assert not others.any()  # exactly zero in every VAE parameter
        else:
            assert not probe.any() and others.abs().sum() > 0


def test_fault_cannot_come_from_a_config(tmp_path):
    config = tmp_path / "dp.yaml"
    config.write_text(yaml.safe_dump(tiny_config(privacy={"mechanism": "dp-sgd", "target_epsilon": 2.0})))
    load_config(config)  # the config itself is valid
    with pytest.raises(ConfigError, match="privacy.fault is a test-only switch") as err:
        load_config(config, {"privacy.fault": "unclipped"})
    assert "\n" not in str(err.value)
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(tiny_config(privacy={"mechanism": "dp-sgd", "target_epsilon": 2.0,
                                                          "fault": "noise-quartered"})))
    with pytest.raises(ConfigError, match="privacy.fault is a test-only switch"):
        load_config(broken)


def test_fault_is_refused_outside_bk_or_unknown():
    spec = PrivacySpec(mechanism="dp-sgd", noise_multiplier=1.0, grad_sample_mode="ghost").validate()
    vae = DiracCanaryVAE({"arch": "mlp", "latent_dim": 2, "hidden": [8]}, torch.Generator().manual_seed(0), 10)
    plan = make_plan(spec, 100, 10, 1.0)
    args = (vae, spec, plan, 1e-3, 1.0, 100, torch.Generator(), torch.Generator())
    with pytest.raises(ValueError, match="bk mode only"):
        DPTrainer(*args, fault="unclipped")
    spec.grad_sample_mode = "bk"
    with pytest.raises(ValueError, match="must be one of"):
        DPTrainer(*args, fault="no-noise")


@pytest.mark.parametrize("epsilon", ["0", "-1", "nan"])
def test_cli_refuses_a_target_epsilon_not_above_zero(epsilon, capsys):
    assert main(["self-audit", f"--epsilon={epsilon}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alignfl-audit: error: the self-audit's target epsilon must be a finite number > 0")
    assert err.count("\n") == 1


def test_cli_prints_the_audit_as_json(sound, capsys, monkeypatch):
    """The command's wiring: its flags reach the audit, the result is printed as JSON, the exit code
    follows ``flagged``. (The audit itself is the fixture's run: the tests above check its content.)"""
    import alignfl_audit.self_audit as self_audit

    calls = []

    def audit(epsilon, delta, recipe, seed, data_root):
        calls.append((epsilon, delta, recipe, seed, data_root))
        return sound

    monkeypatch.setattr(self_audit, "run_self_audit", audit)
    code = main(["self-audit", "--epsilon", "2", "--canaries", "400", "--records", "100", "--epochs", "2",
                 "--sampling-rate", "0.1", "--seed", "3", "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(sound))
    assert code == 0
    ((epsilon, delta, recipe, seed, root),) = calls
    assert (epsilon, delta, seed, root) == (2.0, 1e-5, 3, None)
    assert (recipe.canaries, recipe.records, recipe.epochs, recipe.sampling_rate) == (400, 100, 2, 0.1)
    for key in ("epsilon_lb", "accountant_epsilon", "ideal_epsilon_lb", "m", "r", "v"):
        assert key in sound
    monkeypatch.setattr(self_audit, "run_self_audit", lambda *a, **k: {**sound, "flagged": True})
    assert main(["self-audit", "--epsilon", "2"]) == 1
    assert "FLAGGED" in capsys.readouterr().out
