"""DP-SGD for a client VAE, through Opacus: Poisson sampling, per-sample clipping, Gaussian noise.

Gradient modes (``auto``, the default, resolves to ``bk`` when every trainable parameter of the
privatized module lives in a plain ``nn.Linear`` -- the mlp architecture -- and to ``ghost`` otherwise;
``DPTrainer.mode`` and the ledger hold the resolved mode):
- ``bk``: book-keeping ghost clipping (Bu et al. 2023, ``federation.privacy.bookkeeping``). One
  backward pass of the summed per-sample losses down to the Linear outputs gives the per-sample
  output gradients G_l; with the recorded layer inputs A_l they yield the per-sample norms
  (sum_l ||A_l[i]||^2 ||G_l[i]||^2 + ||G_l[i]||^2) *and* the clipped sums (c * G_l)^T A_l, c^T G_l.
  No second backward pass, no Opacus wrapper. Linear layers on 2-D inputs only.
- ``ghost``: Opacus's fast gradient clipping with ghost norms. A first backward pass
  yields only the per-sample gradient *norms* (||a_i|| * ||g_i|| for linear layers); a second pass
  of the loss re-weighted by min(1, C/norm_i) yields the clipped sum. Nothing of size
  batch x parameters is ever materialized.
- ``hooks`` / ``functorch``: Opacus's GradSampleModule materializes per-sample gradients, and
  Opacus's own optimizers clip them (kept for comparison and cross-checks).

``scope: full`` privatizes the whole VAE (the released decoder is post-processing of a DP
output). ``scope: decoder`` privatizes only the decoder while the encoder trains without DP;
that is kept to show the failure mode and carries no formal guarantee.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _generate_noise
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from federation.models import VAE, vae_loss_per_sample
from federation.precision import adam, forward_precision
from federation.privacy.bookkeeping import LinearBookkeeper, resolve_grad_sample_mode
from federation.privacy.clipping import (AdaptiveRule, ClipRule, ExpectedBatchAdaClipDPOptimizer, MedianClipDPOptimizer,
                                         MedianRule, adjusted_noise_multiplier)
from federation.privacy.spec import TEST_ONLY_FAULTS, PrivacySpec


def clip_rule(spec: PrivacySpec, plan: "DPPlan", expected_batch: float) -> ClipRule:
    """The rule that chooses each batch's clip bound (ghost and bk modes)."""
    if spec.clipping == "adaptive":
        return AdaptiveRule(spec.max_grad_norm, spec.target_quantile, spec.clipbound_lr, spec.min_clipbound,
                            spec.max_clipbound, plan.unclipped_num_std, expected_batch)
    if spec.clipping == "median-nonprivate":
        return MedianRule(spec.max_grad_norm)
    return ClipRule(spec.max_grad_norm)


def bk_clip(bookkeeper: LinearBookkeeper, backprops, rule: ClipRule, batch: int, unclipped: bool = False):
    """Book-keeping clipping of one batch: ({parameter: clipped sum}, per-sample norms, the bound used).
    A record whose gradient is not finite contributes nothing (inf * 0 would turn the whole released update
    into NaN, a data-dependent output), and is counted as clipped (its norm is +inf)."""
    norms = bookkeeper.per_sample_norms(backprops, batch).detach()
    finite = torch.isfinite(norms)
    if not bool(finite.all()):
        backprops = [(layer, None if a is None else a.masked_fill(~finite[:, None], 0.0),
                      None if g is None else g.masked_fill(~finite[:, None], 0.0)) for layer, a, g in backprops]
        norms = norms.masked_fill(~finite, float("inf"))
    bound = rule.bound(norms[finite]) if rule.mode == "median-nonprivate" else rule.bound(norms)
    coeff = (bound / (norms + 1e-6)).clamp(max=1.0).masked_fill(~finite, 0.0)
    if unclipped:  # the self-audit's test-only broken mechanism: every finite gradient passes whole
        coeff = finite.to(coeff.dtype)
    return bookkeeper.clipped_sums(backprops, coeff), norms, bound


@dataclass
class DPPlan:
    """What a client's DP-SGD will do over its whole participation."""

    sample_rate: float
    noise_multiplier: float
    steps_per_epoch: int
    unclipped_num_std: float | None


def make_plan(spec: PrivacySpec, n: int, batch_size: int, noise_multiplier: float) -> DPPlan:
    q = min(1.0, batch_size / n)
    std = None
    if spec.clipping == "adaptive":
        std = spec.unclipped_num_std if spec.unclipped_num_std is not None else q * n / 20.0
    return DPPlan(q, noise_multiplier, int(1 / q), std)


class DPTrainer:
    """``fault``: a test-only breakage (``federation.privacy.spec.TEST_ONLY_FAULTS``, book-keeping mode
    only) for the self-audit's tests; never set from a config. ``fault`` and ``precision`` are keyword-only, so
    that neither can be passed for the other."""

    def __init__(self, vae: VAE, spec: PrivacySpec, plan: DPPlan, lr: float, lambda_kl: float, n: int,
                 generator: torch.Generator, noise_generator: torch.Generator, *, fault: str | None = None,
                 precision: str = "fp32"):
        self.vae, self.spec, self.plan = vae, spec, plan
        self.lambda_kl = lambda_kl
        self.n = n
        self.generator = generator
        self.noise_generator = noise_generator
        self.expected_batch = plan.sample_rate * n
        target = vae if spec.scope == "full" else vae.decoder
        self.private_params = [p for p in target.parameters() if p.requires_grad]
        self.mode = resolve_grad_sample_mode(spec, target)
        if fault is not None and (fault not in TEST_ONLY_FAULTS or self.mode != "bk"):
            raise ValueError(f"fault must be one of {TEST_ONLY_FAULTS}, in bk mode only; got {fault!r} in {self.mode}")
        self.fault = fault
        self._noise_factor = 0.25 if fault == "noise-quartered" else 1.0
        if precision != "fp32" and self.mode != "bk":
            raise ValueError(f"training.precision {precision} needs grad_sample_mode bk (its norms, clipped sums and "
                             f"noise are computed in float32), not {self.mode}")
        self.precision = precision
        self.uses_rule = self.mode in ("ghost", "bk")  # the bound is chosen by self.rule, not by Opacus
        sigma = plan.noise_multiplier
        # the gradient noise multiplier: reduced for the adaptive rule's count release (Andrew et al.)
        self.noise_multiplier = (adjusted_noise_multiplier(sigma, plan.unclipped_num_std)
                                 if spec.clipping == "adaptive" else sigma)
        if self.uses_rule:
            self.rule = clip_rule(spec, plan, self.expected_batch)
        common = dict(noise_multiplier=sigma, max_grad_norm=spec.max_grad_norm,
                      expected_batch_size=self.expected_batch, loss_reduction="mean", generator=noise_generator)
        if self.mode == "bk":
            self.module = target
            self.bookkeeper = LinearBookkeeper(target)
            self.optimizer = self.adam = adam(self.private_params, lr)
        elif self.mode == "ghost":
            self.module = GradSampleModuleFastGradientClipping(target, max_grad_norm=spec.max_grad_norm,
                                                               use_ghost_clipping=True, loss_reduction="mean")
            self.optimizer = DPOptimizerFastGradientClipping(adam(self.private_params, lr), **common)
            if spec.clipping == "adaptive":
                self.optimizer._adjusted_noise_multiplier = self.noise_multiplier
            self.adam = self.optimizer.original_optimizer
        else:
            self.module = GradSampleModule(target, loss_reduction="mean",
                                           force_functorch=self.mode == "functorch")
            inner = adam(self.private_params, lr)
            if spec.clipping == "adaptive":
                self.optimizer = ExpectedBatchAdaClipDPOptimizer(
                    inner, target_unclipped_quantile=spec.target_quantile, clipbound_learning_rate=spec.clipbound_lr,
                    max_clipbound=spec.max_clipbound, min_clipbound=spec.min_clipbound,
                    unclipped_num_std=plan.unclipped_num_std, **common)
            elif spec.clipping == "median-nonprivate":
                self.optimizer = MedianClipDPOptimizer(inner, **common)
            else:
                self.optimizer = DPOptimizer(inner, **common)
            self.adam = inner
        self.encoder_optimizer = (adam(vae.encoder.parameters(), lr)
                                  if spec.scope == "decoder" else None)

    def state_dict(self) -> dict:
        """What the next round continues from: the optimizers and the clip bound. The generators are
        not state: a client derives them from (seed, client, round) every round."""
        return {"adam": self.adam.state_dict(), "clip_bound": self.clip_bound,
                "encoder_optimizer": self.encoder_optimizer.state_dict() if self.encoder_optimizer else None}

    def load_state_dict(self, state: dict) -> None:
        self.adam.load_state_dict(state["adam"])
        if self.encoder_optimizer is not None:
            self.encoder_optimizer.load_state_dict(state["encoder_optimizer"])
        if self.uses_rule:
            self.rule.current = float(state["clip_bound"])
            if self.mode == "ghost":
                self.module.max_grad_norm = self.optimizer.max_grad_norm = self.rule.current
        else:
            self.optimizer.max_grad_norm = float(state["clip_bound"])

    @property
    def clip_bound(self) -> float:
        return float(self.rule.current if self.uses_rule else self.optimizer.max_grad_norm)

    def _per_sample_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses (float32), and the input of the privatized module (the images, or the latents
        with ``scope: decoder``). The forward pass runs in ``self.precision``."""
        with forward_precision(self.precision):
            if self.spec.scope == "full":
                x = x.detach().requires_grad_(self.mode == "ghost")
                recon, mu, logvar = self.module(x, generator=self.generator)
                module_input = x
            else:
                recon, mu, logvar, module_input = self.vae.forward_with_latent(x, self.generator, decoder=self.module)
        return vae_loss_per_sample(x, recon.float(), mu.float(), logvar.float(), self.lambda_kl), module_input

    def _noise_only_step(self) -> None:
        """An empty Poisson batch still releases a noisy update and, with adaptive clipping, a noisy count
        that moves the bound, in every gradient mode alike (skipping either would leak the batch size)."""
        for p in self.private_params:
            p.grad = _generate_noise(std=self._noise_factor * self.noise_multiplier * self.clip_bound, reference=p,
                                     generator=self.noise_generator) / self.expected_batch
        self.adam.step()
        self.adam.zero_grad(set_to_none=True)
        if self.uses_rule:
            self.rule.update(0, 0, self.noise_generator)
        elif isinstance(self.optimizer, ExpectedBatchAdaClipDPOptimizer):  # hooks / functorch, adaptive
            self.optimizer.release_empty_batch_count(self.noise_generator)

    def step(self, x: torch.Tensor) -> float:
        with warnings.catch_warnings():
            # Opacus's full backward hooks warn when the model input (the images) needs no gradient
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            return self._step(x)

    def _step(self, x: torch.Tensor) -> float:
        if len(x) == 0:
            self._noise_only_step()
            return float("nan")
        if self.mode == "bk":
            return self._bk_step(x)
        losses, module_input = self._per_sample_loss(x)
        encoder_grads = None
        if self.encoder_optimizer is not None:  # non-private encoder update (scope: decoder)
            self.module.disable_hooks()  # this pass must not consume the decoder's recorded activations
            encoder_grads = torch.autograd.grad(losses.mean(), list(self.vae.encoder.parameters()),
                                                retain_graph=True)
            self.module.enable_hooks()
        if self.mode == "ghost":
            # pass 1: gradients down to the module's input only, so autograd skips every weight
            # gradient; the hooks turn the backprops into per-sample gradient norms
            torch.autograd.grad(losses.mean(), module_input, retain_graph=True)
            norms = self.module.get_norm_sample().detach()
            bound = self.rule.bound(norms)
            self.module.max_grad_norm = self.optimizer.max_grad_norm = bound
            coeff = (bound / (norms + 1e-6)).clamp(max=1.0)
            self.optimizer.zero_grad(set_to_none=True)
            self.module.disable_hooks()
            (coeff * losses).sum().backward()
            self.module.enable_hooks()
            self.optimizer.step()  # noise sigma*C on the clipped sum, divided by the expected batch size
            self.rule.update(int((norms <= bound).sum()), len(x), self.noise_generator)
        else:
            losses.mean().backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._encoder_step(encoder_grads)
        return float(losses.detach().mean())

    def _encoder_step(self, encoder_grads) -> None:
        if encoder_grads is not None:
            for p, g in zip(self.vae.encoder.parameters(), encoder_grads):
                p.grad = g
            self.encoder_optimizer.step()
            self.encoder_optimizer.zero_grad(set_to_none=True)

    def _bk_step(self, x: torch.Tensor) -> float:
        """Book-keeping clipping: one backward pass, then clipped sums from the recorded tensors."""
        with self.bookkeeper.recording():
            losses, _ = self._per_sample_loss(x)
            encoder_grads = None
            if self.encoder_optimizer is not None:  # non-private encoder update (scope: decoder)
                encoder_grads = torch.autograd.grad(losses.mean(), list(self.vae.encoder.parameters()),
                                                    retain_graph=True)
            # G_l = d(sum_i loss_i)/d(out_l): row i is sample i's gradient w.r.t. the layer output
            backprops = self.bookkeeper.backprops(losses)
        summed, norms, bound = bk_clip(self.bookkeeper, backprops, self.rule, len(x),
                                       unclipped=self.fault == "unclipped")
        del backprops
        std = self._noise_factor * self.noise_multiplier * bound
        for p in self.private_params:  # noise sigma*C on the clipped sum, divided by the expected batch size
            grad = summed.pop(p)
            grad.add_(_generate_noise(std=std, reference=grad, generator=self.noise_generator))
            p.grad = grad.div_(self.expected_batch)
        self.adam.step()
        self.adam.zero_grad(set_to_none=True)
        self.rule.update(int((norms <= bound).sum()), len(x), self.noise_generator)
        self._encoder_step(encoder_grads)
        return float(losses.detach().mean())

    def train_epochs(self, data: torch.Tensor, epochs: int) -> tuple[float, int]:
        """Returns (mean loss of the last epoch, DP steps taken)."""
        self.vae.train()
        sampler = UniformWithReplacementSampler(num_samples=len(data), sample_rate=self.plan.sample_rate,
                                                generator=self.generator, steps=self.plan.steps_per_epoch)
        steps, last = 0, 0.0
        for _ in range(epochs):
            losses = []
            for idx in sampler:
                loss = self.step(data.index_select(0, torch.as_tensor(idx, dtype=torch.long)))
                steps += 1
                if loss == loss:
                    losses.append(loss)
            last = sum(losses) / max(len(losses), 1)
        return last, steps
