"""Training numerics: fused Adam everywhere, and ``training.precision: bf16``, whose forward matmuls run in
bfloat16 while weights, loss and, with DP-SGD, the per-sample norms, clipped sums and noise stay float32.

The clipping invariant is checked under bf16 too: with sigma = 0 and every record clipped, one record's
contribution to the released sum has norm C (the norm and the sum are computed from the same widened
records), and a batch's has at most B * C."""
from __future__ import annotations

import pytest
import torch

from alignfl_audit.config import from_dict
from conftest import tiny_config
from federation import models
from federation.client import Client
from federation.errors import ConfigError
from federation.models import VAE
from federation.privacy import dp_sgd
from federation.privacy.bookkeeping import LinearBookkeeper
from federation.privacy.dp_sgd import DPPlan, DPTrainer
from federation.privacy.spec import PrivacySpec
from federation.training import train_epochs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SPEC = {"arch": "mlp", "latent_dim": 2, "hidden": [32, 16]}


def _trainer(precision: str, sigma: float, bound: float, n: int = 40, q: float = 0.25) -> DPTrainer:
    vae = VAE(SPEC, torch.Generator().manual_seed(0))
    spec = PrivacySpec(mechanism="dp-sgd", noise_multiplier=sigma or 1.0, clipping="fixed", max_grad_norm=bound,
                       grad_sample_mode="bk").validate()
    plan = DPPlan(sample_rate=q, noise_multiplier=sigma, steps_per_epoch=int(1 / q), unclipped_num_std=None)
    return DPTrainer(vae, spec, plan, lr=1e-3, lambda_kl=1.0, n=n, generator=torch.Generator().manual_seed(1),
                     noise_generator=torch.Generator().manual_seed(2), precision=precision)


def _released(trainer: DPTrainer, x: torch.Tensor) -> torch.Tensor:
    """The flat gradient one step hands to Adam."""
    seen = {}
    real = trainer.adam.step

    def step(*a, **k):
        seen["grad"] = torch.cat([p.grad.detach().flatten() for p in trainer.private_params])
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer.adam, "step", step)
        trainer.step(x)
    return seen["grad"]


def _records(n: int) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(3))


def test_a_bf16_dp_step_clips_and_noises_in_float32(monkeypatch):
    trainer = _trainer("bf16", sigma=1.0, bound=0.5)
    seen = {"forward": set(), "records": set(), "norms": None, "sums": set(), "noise": set(), "grads": set()}
    trainer.vae.decoder.register_forward_hook(lambda m, i, o: seen["forward"].add(o.dtype))
    real_backprops, real_sums = LinearBookkeeper.backprops, LinearBookkeeper.clipped_sums
    real_bound, real_noise, real_adam = trainer.rule.bound, dp_sgd._generate_noise, trainer.adam.step

    def backprops(self, losses):
        out = real_backprops(self, losses)
        seen["records"] |= {t.dtype for _, a, g in out for t in (a, g) if t is not None}
        return out

    def clipped_sums(backprops, coeff):
        out = real_sums(backprops, coeff)
        seen["sums"] |= {t.dtype for t in out.values()}
        return out

    def bound(norms):
        seen["norms"] = norms.dtype
        return real_bound(norms)

    def noise(std, reference, generator):
        out = real_noise(std=std, reference=reference, generator=generator)
        seen["noise"] |= {reference.dtype, out.dtype}
        return out

    def adam_step(*a, **k):
        seen["grads"] |= {p.grad.dtype for p in trainer.private_params}
        return real_adam(*a, **k)

    monkeypatch.setattr(LinearBookkeeper, "backprops", backprops)
    monkeypatch.setattr(LinearBookkeeper, "clipped_sums", staticmethod(clipped_sums))
    monkeypatch.setattr(trainer.rule, "bound", bound)
    monkeypatch.setattr(dp_sgd, "_generate_noise", noise)
    monkeypatch.setattr(trainer.adam, "step", adam_step)
    trainer.step(_records(10))
    assert seen["forward"] == {torch.bfloat16}  # the forward really ran in bfloat16 ...
    assert seen["norms"] == torch.float32  # ... and the clipping and noise did not
    assert seen["records"] == seen["sums"] == seen["noise"] == seen["grads"] == {torch.float32}
    assert all(p.dtype == torch.float32 for p in trainer.vae.parameters())


def test_under_bf16_one_clipped_record_contributes_exactly_the_bound():
    bound = 1e-3  # far below every per-sample gradient norm: every record is clipped
    for n_records in (1, 6):
        trainer = _trainer("bf16", sigma=0.0, bound=bound)
        grad = _released(trainer, _records(n_records))
        total = float(grad.norm()) * trainer.expected_batch
        if n_records == 1:
            assert total == pytest.approx(bound, rel=1e-4)
        assert total <= n_records * bound * (1 + 1e-4)


def test_bf16_and_fp32_dp_steps_release_nearly_the_same_clipped_sum():
    x = _records(8)
    grads = {p: _released(_trainer(p, sigma=0.0, bound=1e6), x) for p in ("fp32", "bf16")}  # nothing clipped
    cosine = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cosine > 0.99 and not torch.equal(grads["fp32"], grads["bf16"])


def test_bf16_training_keeps_float32_weights_and_repeats_exactly(monkeypatch):
    outputs = set()
    losses, weights = {}, {}
    for precision in ("fp32", "bf16", "bf16"):
        vae = VAE(SPEC, torch.Generator().manual_seed(0))
        handle = vae.decoder.register_forward_hook(lambda m, i, o: outputs.add(o.dtype))
        loss = train_epochs(vae, torch.optim.Adam(vae.parameters(), lr=1e-3), _records(64), 2, 16, 1.0,
                            torch.Generator().manual_seed(1), precision=precision)
        handle.remove()
        state = torch.cat([p.detach().flatten() for p in vae.parameters()])
        if precision in weights:  # the second bf16 run: bit for bit the first
            assert loss == losses[precision] and torch.equal(state, weights[precision])
        losses[precision], weights[precision] = loss, state
        assert all(p.dtype == torch.float32 for p in vae.parameters())
    assert outputs == {torch.float32, torch.bfloat16}
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02) and losses["bf16"] != losses["fp32"]


def test_the_reparameterization_noise_is_drawn_in_float32_under_bf16():
    mu = torch.zeros(4, 2, dtype=torch.bfloat16)
    a = models.reparameterization_noise(mu, torch.Generator().manual_seed(0))
    b = models.reparameterization_noise(mu.float(), torch.Generator().manual_seed(0))
    assert a.dtype == torch.float32 and torch.equal(a, b)


def test_every_trainer_uses_fused_adam():
    from alignfl_audit.orchestrate import prepare
    cfg = from_dict(tiny_config(privacy={"mechanism": "dp-sgd", "noise_multiplier": 1.0, "delta": 1e-5}))
    setup = prepare(cfg)[2][0]
    client = Client(setup, None, 0)
    assert client.optimizer.param_groups[0]["fused"] is True
    assert client.dp.adam.param_groups[0]["fused"] is True
    for mode in ("ghost", "hooks"):
        spec = PrivacySpec(mechanism="dp-sgd", noise_multiplier=1.0, grad_sample_mode=mode).validate()
        trainer = DPTrainer(VAE(SPEC, torch.Generator().manual_seed(0)), spec, setup.dp_plan, 1e-3, 1.0, 40,
                            torch.Generator(), torch.Generator())
        assert trainer.adam.param_groups[0]["fused"] is True  # inside Opacus's DP optimizer


@pytest.mark.parametrize("overrides, message", [
    ({"training": {"precision": "fp16"}}, "training.precision must be one of fp32, bf16"),
    ({"training": {"precision": "bf16"}, "model": {"arch": "conv", "latent_dim": 2},
      "privacy": {"mechanism": "dp-sgd", "target_epsilon": 4.0, "delta": 1e-5}}, "runs ghost"),
    ({"training": {"precision": "bf16"},
      "privacy": {"mechanism": "dp-sgd", "target_epsilon": 4.0, "delta": 1e-5, "grad_sample_mode": "hooks"}},
     "runs hooks"),
])
def test_bf16_is_refused_where_its_clipping_would_not_be_float32(overrides, message):
    cfg = tiny_config(**overrides)
    if "model" in overrides:
        cfg["model"] = overrides["model"]  # replace the base's mlp spec rather than merge into it
    with pytest.raises(ConfigError, match=message):
        from_dict(cfg)


def test_a_bf16_latent_fit_searches_in_bfloat16_and_scores_in_float32():
    from attacks.latent_fit import fit_latents

    decoder = VAE(SPEC, torch.Generator().manual_seed(0)).decoder.eval().requires_grad_(False)
    dtypes = set()
    decoder.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    fits = {p: fit_latents(decoder, _records(12), 2, torch.Generator().manual_seed(4), init=64, steps=5, precision=p)
            for p in ("fp32", "bf16")}
    assert dtypes == {torch.float32, torch.bfloat16}
    for fit in fits.values():
        assert all(t.dtype == torch.float32 for t in (fit.latents, fit.reconstructions, fit.objective, fit.distance))
    # the score is the float32 objective of the latent found: exactly recomputable from it
    again = (decoder(fits["bf16"].latents).flatten(1) - _records(12).flatten(1)).pow(2).sum(1) \
        + 0.01 * fits["bf16"].latents.pow(2).sum(1)
    torch.testing.assert_close(fits["bf16"].objective, again)
    assert torch.allclose(fits["bf16"].objective, fits["fp32"].objective, rtol=1e-2)
    with pytest.raises(ConfigError, match="audit.latent_fit_precision must be one of fp32, bf16"):
        from_dict(tiny_config(audit={"latent_fit_precision": "fp16"}))
