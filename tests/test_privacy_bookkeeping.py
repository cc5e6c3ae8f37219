"""Book-keeping ghost clipping (``grad_sample_mode: bk``), checked against exact per-sample gradients
(``torch.func.vmap(grad(...))`` in float64) and against Opacus's ghost clipping.

- ``LinearBookkeeper`` on random MLPs: per-sample norms and clipped sums are the exact ones.
- ``DPTrainer`` in bk mode on random MLP VAEs (both scopes, gradient magnitudes over four orders):
  with sigma = 0 the gradient handed to Adam is sum_i min(1, C/||g_i||) g_i / (q n), the norms the
  clip rule sees are the exact per-sample norms, and (scope decoder) the encoder gets its plain
  non-private mean gradient.
- bk and ghost agree: same norms, same clipped sums, and -- with the same seeds -- the same noise
  and the same trajectory over a few steps.
- Noise: chi-square variance tests (false-alarm rate 1e-3) for std sigma*C (fixed) and
  adjusted_noise_multiplier(sigma, sigma_b)*C (adaptive), also for an empty Poisson batch.
- ``auto`` resolves to bk for the mlp architecture and to ghost for conv / spectral-norm models;
  an explicit bk on those is a one-line ConfigError (from the trainer and from the config).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from alignfl_audit.config import from_dict
from conftest import tiny_config
from federation.errors import ConfigError
from federation import models
from federation.models import VAE
from federation.privacy.bookkeeping import LinearBookkeeper, resolve_grad_sample_mode
from federation.privacy.clipping import adjusted_noise_multiplier
from federation.privacy.dp_sgd import DPPlan, DPTrainer
from federation.privacy.spec import PrivacySpec
from test_privacy_clipping import (LAMBDA_KL, TINY_VAE, chi2_variance_ok, clipped_sum, flat_norms, per_sample_losses,
                                   ref_coeff, reference_grads, vae_reference_grads)

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models on busy cores: one intra-op thread (the conftest fixture restores it)."""


def trainer_for(model_spec: dict, mode: str = "bk", clipping: str = "fixed", sigma: float = 0.0, bound: float = 1.0,
                n: int = 40, q: float = 0.25, scope: str = "full", unclipped_num_std: float | None = None,
                seed: int = 0) -> DPTrainer:
    """As ``make_trainer`` in test_privacy_clipping, for any model spec: the config refuses sigma = 0,
    so the spec validates with 1.0 and the plan (which the trainer uses) carries ``sigma``."""
    vae = VAE(model_spec, torch.Generator().manual_seed(seed))
    spec = PrivacySpec(mechanism="dp-sgd", noise_multiplier=sigma or 1.0, clipping=clipping, max_grad_norm=bound,
                       grad_sample_mode=mode, scope=scope, unclipped_num_std=unclipped_num_std).validate()
    plan = DPPlan(sample_rate=q, noise_multiplier=sigma, steps_per_epoch=int(1 / q),
                  unclipped_num_std=unclipped_num_std if clipping == "adaptive" else None)
    return DPTrainer(vae, spec, plan, lr=1e-3, lambda_kl=LAMBDA_KL, n=n, generator=torch.Generator().manual_seed(1),
                     noise_generator=torch.Generator().manual_seed(seed + 7))


def spy_step(trainer: DPTrainer, x: torch.Tensor, eps: torch.Tensor | None) -> dict:
    """One ``trainer.step`` with the reparameterization noise fixed to ``eps``. Returns {"grads": the
    private gradients handed to Adam, "norms": what the clip rule was given, "bound": the bound it
    chose, "encoder": the encoder gradients (scope decoder)}."""
    names = {id(p): k for k, p in trainer.vae.named_parameters()}
    seen: dict = {"grads": {}, "encoder": {}}
    real_adam, real_bound = trainer.adam.step, trainer.rule.bound

    def adam_step(*a, **k):
        seen["grads"].update({names[id(p)]: p.grad.detach().clone() for p in trainer.private_params})
        return real_adam(*a, **k)

    def bound(norms):
        seen["norms"] = norms.detach().clone()
        seen["bound"] = real_bound(norms)
        return seen["bound"]

    with pytest.MonkeyPatch.context() as mp:
        if eps is not None:
            mp.setattr(models, "reparameterization_noise", lambda t, g: eps.to(t.dtype).clone())
        mp.setattr(trainer.adam, "step", adam_step)
        mp.setattr(trainer.rule, "bound", bound)
        if trainer.encoder_optimizer is not None:
            real_enc = trainer.encoder_optimizer.step

            def enc_step(*a, **k):
                seen["encoder"].update({names[id(p)]: p.grad.detach().clone()
                                        for p in trainer.vae.encoder.parameters()})
                return real_enc(*a, **k)
            mp.setattr(trainer.encoder_optimizer, "step", enc_step)
        trainer.step(x)
    return seen


# ------------------------------------------------------------------ the book-keeping arithmetic itself
@st.composite
def mlps(draw):
    """A random float64 MLP on (B, d) inputs, some layers without bias, and a loss scale."""
    widths = draw(st.lists(st.integers(1, 7), min_size=2, max_size=4))
    layers = []
    for i in range(len(widths) - 1):
        layers += [torch.nn.Linear(widths[i], widths[i + 1], bias=draw(st.booleans())), torch.nn.Tanh()]
    seed = draw(st.integers(0, 2**31 - 1))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*layers[:-1]).double()
    g = torch.Generator().manual_seed(seed)
    batch = draw(st.integers(1, 10))
    x = torch.randn(batch, widths[0], generator=g, dtype=torch.float64)
    y = torch.randn(batch, widths[-1], generator=g, dtype=torch.float64)
    return model, x, y, 10 ** draw(st.floats(-3, 3))


@SETTINGS
@given(mlps(), st.floats(-2, 2))
def test_bookkeeper_norms_and_clipped_sums_are_exact(problem, log_bound):
    model, x, y, scale = problem
    bound = 10 ** log_bound
    ref = reference_grads(copy.deepcopy(model), x, y, scale)
    true_norms = flat_norms(ref)
    keeper = LinearBookkeeper(model)
    with keeper.recording():
        backprops = keeper.backprops(per_sample_losses(model(x), y, scale))
    norms = keeper.per_sample_norms(backprops, len(x))
    torch.testing.assert_close(norms, true_norms, rtol=1e-9, atol=1e-12 * float(true_norms.max()))
    coeff = ref_coeff(true_norms, bound)
    got = keeper.clipped_sums(backprops, coeff)
    want = clipped_sum(ref, coeff)
    params = dict(model.named_parameters())
    assert set(got) == set(params.values())
    for name, value in want.items():
        torch.testing.assert_close(got[params[name]], value, rtol=1e-9, atol=1e-12 * (float(true_norms.max()) + 1))
    assert all(p.grad is None for p in model.parameters())  # no weight gradient was computed by autograd


def test_bookkeeper_refuses_non_2d_inputs_and_leaves_no_hooks():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    keeper = LinearBookkeeper(model)
    with pytest.raises(RuntimeError, match="2-D inputs"), keeper.recording():
        model(torch.randn(4, 5, 3))
    assert not model[0]._forward_hooks


# ------------------------------------------------------------------ DPTrainer in bk mode vs exact per-sample gradients
@st.composite
def vae_cases(draw):
    spec = {"arch": "mlp", "latent_dim": draw(st.integers(1, 3)),
            "hidden": draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))}
    batch = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, 28, 28, generator=g) * 10 ** draw(st.floats(-2, 1))  # gradient magnitudes
    eps = torch.randn(batch, spec["latent_dim"], generator=g)
    return spec, x, eps, 10 ** draw(st.floats(-2, 2)), draw(st.sampled_from(["full", "decoder"])), seed


@SETTINGS
@given(vae_cases())
def test_bk_hands_adam_the_exact_clipped_sum_over_the_expected_batch(case):
    spec, x, eps, bound, scope, seed = case
    trainer = trainer_for(spec, "bk", "fixed", sigma=0.0, bound=bound, n=40, q=0.25, scope=scope, seed=seed % 1000)
    assert trainer.mode == "bk"
    ref = vae_reference_grads(trainer.vae, x, eps)  # before the step moves the parameters
    seen = spy_step(trainer, x, eps)
    private = {k: v for k, v in ref.items() if k.startswith("decoder.") or scope == "full"}
    norms = flat_norms(private)
    # a one-unit encoder on bright images can put exp(logvar) beyond any float: no gradient to clip
    assume(bool(torch.isfinite(norms).all()) and float(norms.max()) < 1e30)
    torch.testing.assert_close(seen["norms"].double(), norms, rtol=1e-4, atol=1e-6 * float(norms.max()))
    want = clipped_sum(private, ref_coeff(norms, bound))
    assert set(seen["grads"]) == set(want)
    expected_batch = 10.0
    for name, value in want.items():
        torch.testing.assert_close(seen["grads"][name].double(), value / expected_batch, rtol=2e-4,
                                   atol=2e-5 * min(bound, float(norms.max())) / expected_batch, msg=name)
    if scope == "decoder":  # the encoder trains without DP: the plain mean gradient over the batch
        enc = {k: v for k, v in ref.items() if k.startswith("encoder.")}
        assert set(seen["encoder"]) == set(enc)
        for name, value in enc.items():
            scale_ref = float(value.abs().max()) + 1e-12
            torch.testing.assert_close(seen["encoder"][name].double(), value.mean(0), rtol=2e-4,
                                       atol=2e-5 * scale_ref, msg=name)


@pytest.mark.parametrize("scope", ["full", "decoder"])
@pytest.mark.parametrize("clipping", ["fixed", "adaptive", "median-nonprivate"])
def test_bk_and_ghost_agree_on_norms_clipped_sums_and_noise(scope, clipping):
    """Same batch, same reparameterization noise: the same per-sample norms and clipped sums (sigma =
    0); with sigma = 1 and the same noise seed, the same noised gradients and the same parameters and
    clip bounds after three steps (bk draws the gradient noise in Opacus's order)."""
    g = torch.Generator().manual_seed(17)
    xs = [torch.rand(b, 1, 28, 28, generator=g) for b in (9, 5, 12)]
    epss = [torch.randn(len(x), 2, generator=g) for x in xs]
    std = 2.0 if clipping == "adaptive" else None
    runs = {}
    for sigma in (0.0, 1.0):
        for mode in ("bk", "ghost"):
            trainer = trainer_for(TINY_VAE, mode, clipping, sigma=sigma, bound=0.4, n=40, q=0.25, scope=scope,
                                  unclipped_num_std=std)
            assert trainer.mode == mode
            steps = [spy_step(trainer, x, eps) for x, eps in zip(xs, epss)]
            runs[sigma, mode] = steps, trainer
    for sigma in (0.0, 1.0):
        (bk, bk_trainer), (ghost, ghost_trainer) = runs[sigma, "bk"], runs[sigma, "ghost"]
        for a, b in zip(bk, ghost):
            torch.testing.assert_close(a["norms"], b["norms"], rtol=1e-4, atol=1e-7)
            assert a["bound"] == pytest.approx(b["bound"], rel=1e-5)
            assert set(a["grads"]) == set(b["grads"])
            for name in a["grads"]:
                torch.testing.assert_close(a["grads"][name], b["grads"][name], rtol=1e-3, atol=1e-6, msg=name)
        assert bk_trainer.clip_bound == pytest.approx(ghost_trainer.clip_bound, rel=1e-5)
        ghost_params = dict(ghost_trainer.vae.named_parameters())
        for name, p in bk_trainer.vae.named_parameters():
            torch.testing.assert_close(p, ghost_params[name], rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------ noise
@pytest.mark.parametrize("scope", ["full", "decoder"])
@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_bk_noise_has_std_multiplier_times_bound(clipping, scope):
    """Noise = grad * (q n) - exact clipped sum (float64 reference) over every private coordinate;
    two-sided chi-square variance test at alpha = 1e-3 for std sigma*C (fixed) or
    adjusted_noise_multiplier(sigma, sigma_b)*C (adaptive), which must also reject sigma*C."""
    sigma, bound, std_count = 1.0, 0.7, 0.75
    trainer = trainer_for(TINY_VAE, "bk", clipping, sigma=sigma, bound=bound, n=100, q=0.25, scope=scope,
                          unclipped_num_std=std_count if clipping == "adaptive" else None)
    g = torch.Generator().manual_seed(11)
    x = torch.rand(6, 1, 28, 28, generator=g)
    eps = torch.randn(6, 2, generator=g)
    ref = vae_reference_grads(trainer.vae, x, eps)
    seen = spy_step(trainer, x, eps)
    private = {k: v for k, v in ref.items() if k in seen["grads"]}
    want = clipped_sum(private, ref_coeff(flat_norms(private), bound))
    noise = np.concatenate([(seen["grads"][k].double() * 25.0 - want[k]).flatten().numpy() for k in want])
    assert noise.size > 12000
    multiplier = adjusted_noise_multiplier(sigma, std_count) if clipping == "adaptive" else sigma
    if clipping == "adaptive":
        assert not chi2_variance_ok(noise, sigma * bound)[0]
    ok, ratio, se = chi2_variance_ok(noise, multiplier * bound)
    assert ok, f"noise variance / (multiplier*C)^2 = {ratio:.4f} (standard error {se:.4f})"


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_bk_empty_poisson_batch_still_releases_noise(clipping):
    sigma, bound, std_count = 1.3, 2.0, 1.0
    trainer = trainer_for(TINY_VAE, "bk", clipping, sigma=sigma, bound=bound, n=100, q=0.25,
                          unclipped_num_std=std_count if clipping == "adaptive" else None)
    before = trainer.clip_bound
    seen = spy_step(trainer, torch.zeros(0, 1, 28, 28), None)
    noise = np.concatenate([(gr.double() * 25.0).flatten().numpy() for gr in seen["grads"].values()])
    multiplier = adjusted_noise_multiplier(sigma, std_count) if clipping == "adaptive" else sigma
    ok, ratio, se = chi2_variance_ok(noise, multiplier * bound)
    assert ok, f"noise variance / (multiplier*C)^2 = {ratio:.4f} (standard error {se:.4f})"
    if clipping == "adaptive":
        assert trainer.clip_bound != before


# ------------------------------------------------------------------ which mode runs
CONV = {"arch": "conv", "latent_dim": 2, "channels": [4, 8], "fc": 16}
SPECTRAL = {**TINY_VAE, "spectral_norm": True}


@pytest.mark.parametrize("model,scope,resolved", [
    (TINY_VAE, "full", "bk"), (TINY_VAE, "decoder", "bk"), (CONV, "full", "ghost"), (CONV, "decoder", "ghost"),
    (SPECTRAL, "full", "ghost"), (SPECTRAL, "decoder", "ghost"),
])
def test_auto_resolves_to_bk_only_for_plain_linear_models(model, scope, resolved):
    assert PrivacySpec().grad_sample_mode == "auto"
    spec = PrivacySpec(mechanism="dp-sgd", noise_multiplier=1.0, scope=scope).validate()
    vae = VAE(model)
    assert resolve_grad_sample_mode(spec, vae if scope == "full" else vae.decoder) == resolved
    if model is SPECTRAL:
        return  # Opacus's ghost clipping refuses spectral-norm layers (their buffers) on its own
    trainer = trainer_for(model, "auto", sigma=1.0, scope=scope)
    assert trainer.mode == resolved and trainer.spec.grad_sample_mode == "auto"  # the spec keeps "auto"
    trainer.step(torch.rand(3, 1, 28, 28))  # and the resolved mode trains


@pytest.mark.parametrize("model,scope,culprit", [
    (CONV, "full", "encoder.body.0 is a Conv2d"), (CONV, "decoder", "decoder.5 is a ConvTranspose2d"),
    (SPECTRAL, "decoder", "decoder.0 is a parametrized Linear"),
])
def test_explicit_bk_on_an_ineligible_model_is_a_one_line_config_error(model, scope, culprit):
    with pytest.raises(ConfigError) as info:
        trainer_for(model, "bk", sigma=1.0, scope=scope)
    msg = str(info.value)
    assert "\n" not in msg and "privacy.grad_sample_mode bk" in msg and culprit in msg, msg
    # the config refuses it before any data is read
    cfg = tiny_config()
    cfg["model"] = model
    cfg["privacy"] = {"mechanism": "dp-sgd", "noise_multiplier": 1.0, "grad_sample_mode": "bk", "scope": scope}
    with pytest.raises(ConfigError) as info:
        from_dict(cfg)
    assert "\n" not in str(info.value) and culprit in str(info.value)
    cfg["model"] = TINY_VAE
    assert from_dict(cfg).privacy.grad_sample_mode == "bk"


def test_a_record_with_a_non_finite_gradient_contributes_nothing():
    """A record whose loss overflows must not turn the released update into NaN (a data-dependent
    output): it gets coefficient 0, and the update equals the clipped sum over the other records."""
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(6, 2, generator=torch.Generator().manual_seed(4))
    poisoned = x.clone()
    poisoned[0] = 1e30  # the squared error overflows float32
    got = spy_step(trainer_for(TINY_VAE), poisoned, eps)
    assert all(bool(torch.isfinite(g).all()) for g in got["grads"].values())
    want = spy_step(trainer_for(TINY_VAE), x[1:], eps[1:])  # the same trainer state without record 0
    for name, g in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)
