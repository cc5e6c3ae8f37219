"""DP-SGD for a client VAE, through Opacus: Poisson sampling, per-sample clipping, Gaussian noise.

Gradient modes:
- ``ghost`` (default): Opacus's fast gradient clipping with ghost norms. A first backward pass
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
from federation.privacy.clipping import (AdaptiveRule, ClipRule, ExpectedBatchAdaClipDPOptimizer, MedianClipDPOptimizer,
                                         MedianRule, adjusted_noise_multiplier)
from federation.privacy.spec import PrivacySpec


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
    def __init__(self, vae: VAE, spec: PrivacySpec, plan: DPPlan, lr: float, lambda_kl: float, n: int,
                 generator: torch.Generator, noise_generator: torch.Generator):
        self.vae, self.spec, self.plan = vae, spec, plan
        self.lambda_kl = lambda_kl
        self.n = n
        self.generator = generator
        self.noise_generator = noise_generator
        self.expected_batch = plan.sample_rate * n
        target = vae if spec.scope == "full" else vae.decoder
        self.private_params = [p for p in target.parameters() if p.requires_grad]
        self.ghost = spec.grad_sample_mode == "ghost"
        sigma = plan.noise_multiplier
        common = dict(noise_multiplier=sigma, max_grad_norm=spec.max_grad_norm,
                      expected_batch_size=self.expected_batch, loss_reduction="mean", generator=noise_generator)
        if self.ghost:
            self.module = GradSampleModuleFastGradientClipping(target, max_grad_norm=spec.max_grad_norm,
                                                               use_ghost_clipping=True, loss_reduction="mean")
            self.optimizer = DPOptimizerFastGradientClipping(torch.optim.Adam(self.private_params, lr=lr), **common)
            if spec.clipping == "adaptive":
                self.rule: ClipRule = AdaptiveRule(spec.max_grad_norm, spec.target_quantile, spec.clipbound_lr,
                                                   spec.min_clipbound, spec.max_clipbound, plan.unclipped_num_std,
                                                   self.expected_batch)
                self.optimizer._adjusted_noise_multiplier = adjusted_noise_multiplier(sigma, plan.unclipped_num_std)
            elif spec.clipping == "median-nonprivate":
                self.rule = MedianRule(spec.max_grad_norm)
            else:
                self.rule = ClipRule(spec.max_grad_norm)
        else:
            self.module = GradSampleModule(target, loss_reduction="mean",
                                           force_functorch=spec.grad_sample_mode == "functorch")
            adam = torch.optim.Adam(self.private_params, lr=lr)
            if spec.clipping == "adaptive":
                self.optimizer = ExpectedBatchAdaClipDPOptimizer(
                    adam, target_unclipped_quantile=spec.target_quantile, clipbound_learning_rate=spec.clipbound_lr,
                    max_clipbound=spec.max_clipbound, min_clipbound=spec.min_clipbound,
                    unclipped_num_std=plan.unclipped_num_std, **common)
            elif spec.clipping == "median-nonprivate":
                self.optimizer = MedianClipDPOptimizer(adam, **common)
            else:
                self.optimizer = DPOptimizer(adam, **common)
        self.encoder_optimizer = (torch.optim.Adam(vae.encoder.parameters(), lr=lr)
                                  if spec.scope == "decoder" else None)

    @property
    def clip_bound(self) -> float:
        return float(self.rule.current if self.ghost else self.optimizer.max_grad_norm)

    def _per_sample_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses, and the input of the privatized module (the images, or the latents
        with ``scope: decoder``)."""
        if self.spec.scope == "full":
            x = x.detach().requires_grad_(self.ghost)
            recon, mu, logvar = self.module(x)
            return vae_loss_per_sample(x, recon, mu, logvar, self.lambda_kl), x
        recon, mu, logvar, z = self.vae.forward_with_latent(x, decoder=self.module)
        return vae_loss_per_sample(x, recon, mu, logvar, self.lambda_kl), z

    def _noise_only_step(self) -> None:
        """An empty Poisson batch still releases a noisy update (skipping it would leak the batch size)."""
        sigma = getattr(self.optimizer, "_adjusted_noise_multiplier", None) or self.plan.noise_multiplier
        for p in self.private_params:
            p.grad = _generate_noise(std=sigma * self.clip_bound, reference=p, generator=self.noise_generator
                                     ) / self.expected_batch
        self.optimizer.original_optimizer.step()
        self.optimizer.original_optimizer.zero_grad(set_to_none=True)
        if self.ghost:
            self.rule.update(0, 0, self.noise_generator)

    def step(self, x: torch.Tensor) -> float:
        with warnings.catch_warnings():
            # Opacus's full backward hooks warn when the model input (the images) needs no gradient
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            return self._step(x)

    def _step(self, x: torch.Tensor) -> float:
        if len(x) == 0:
            self._noise_only_step()
            return float("nan")
        losses, module_input = self._per_sample_loss(x)
        encoder_grads = None
        if self.encoder_optimizer is not None:  # non-private encoder update (scope: decoder)
            self.module.disable_hooks()  # this pass must not consume the decoder's recorded activations
            encoder_grads = torch.autograd.grad(losses.mean(), list(self.vae.encoder.parameters()),
                                                retain_graph=True)
            self.module.enable_hooks()
        if self.ghost:
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
        if encoder_grads is not None:
            for p, g in zip(self.vae.encoder.parameters(), encoder_grads):
                p.grad = g
            self.encoder_optimizer.step()
            self.encoder_optimizer.zero_grad(set_to_none=True)
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
                loss = self.step(data[torch.as_tensor(idx, dtype=torch.long)])
                steps += 1
                if loss == loss:
                    losses.append(loss)
            last = sum(losses) / max(len(losses), 1)
        return last, steps
