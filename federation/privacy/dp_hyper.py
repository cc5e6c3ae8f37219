"""DP-SGD for a FedHypeVAE client: one Gaussian mechanism per step over everything the client trains on
its records (its private code, its encoder and the hypernetwork), plus the real batch's MMD embedding.

Each step, on a Poisson batch (Opacus's sampler, rate q):

1. book-keeping clipping (``federation.privacy.bookkeeping``) gives every record's exact gradient of its
   own loss (the conditional VAE's reconstruction and KL) with respect to the code, the encoder and the
   hypernetwork, jointly, and clips it to the bound C (the same clip rules as ``DPTrainer``: fixed,
   adaptive, median-nonprivate);
2. with an MMD term, each record also contributes C * phi(x, y), its unit-norm kernel feature
   (``federation.mmd``), so record i's whole contribution u_i = (clipped gradient, C phi_i) has norm at most
   S = sqrt(2) C (S = C without MMD);
3. Gaussian noise of std sigma_g * S is added to the sum of the u_i (Opacus's noise), with sigma_g the
   noise multiplier (reduced for the adaptive rule's count release exactly as in ``DPTrainer``); the sums are
   divided by the expected batch size q n. That is one subsampled Gaussian mechanism with noise multiplier
   sigma, recorded in the ledger as (q, sigma, steps) like any DP-SGD step;
4. what the step adds after that is a function of released values and of the client's state only:
   the MMD term's gradient uses the released (noisy) real embedding against a synthetic batch; the
   Lipschitz and code-anchor terms depend on the hypernetwork and the code alone. Post-processing: no
   privacy cost.

The state every step starts from (code, encoder, hypernetwork) is therefore itself a function of
released values, so each step is an adaptive composition of the recorded mechanism, and every
hypernetwork update the client shares is post-processing of them. The code and encoder, which never leave,
are noised too: privatizing only the shared hypernetwork would let a non-private code and encoder, trained
on every record, shape its per-example gradients, and the clip bound would no longer bound one record's
influence on the update.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from opacus.optimizers.optimizer import _generate_noise
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from federation.privacy.bookkeeping import LinearBookkeeper
from federation.privacy.clipping import adjusted_noise_multiplier
from federation.privacy.dp_sgd import DPPlan, bk_clip, clip_rule
from federation.privacy.spec import PrivacySpec

MODE = "bk"


class HyperDPStep:
    """Privatizes one batch's gradient (and MMD embedding) for ``module``'s parameters; the caller owns the
    optimizers. ``per_sample_loss(x, y)`` -> (B,) losses; ``features(x, y)`` -> (B, D) unit-norm features
    (None: no MMD term)."""

    def __init__(self, module: torch.nn.Module, spec: PrivacySpec, plan: DPPlan, n: int,
                 noise_generator: torch.Generator, features: Callable | None):
        self.spec, self.plan, self.features = spec, plan, features
        self.noise_generator = noise_generator
        self.expected_batch = plan.sample_rate * n
        self.bookkeeper = LinearBookkeeper(module)
        self.private_params = [p for p in module.parameters() if p.requires_grad]
        sigma = plan.noise_multiplier
        self.noise_multiplier = (adjusted_noise_multiplier(sigma, plan.unclipped_num_std)
                                 if spec.clipping == "adaptive" else sigma)
        self.rule = clip_rule(spec, plan, self.expected_batch)
        self.mode = MODE

    @property
    def clip_bound(self) -> float:
        return float(self.rule.current)

    def load_clip_bound(self, bound: float) -> None:
        self.rule.current = float(bound)

    def sensitivity(self, bound: float) -> float:
        return bound * (math.sqrt(2.0) if self.features is not None else 1.0)

    def release(self, x: torch.Tensor, y: torch.Tensor, per_sample_loss: Callable) -> tuple[float, torch.Tensor | None]:
        """Set every private parameter's ``.grad`` to the noisy clipped mean gradient; return (the batch's
        mean loss, NaN for an empty batch; the noisy real mean embedding, or None without MMD)."""
        bound, noise_of = self.rule.current, None
        if len(x):
            with self.bookkeeper.recording():
                losses = per_sample_loss(x, y)
                backprops = self.bookkeeper.backprops(losses)
            summed, norms, bound = bk_clip(self.bookkeeper, backprops, self.rule, len(x))
            del backprops
            unclipped = int((norms <= bound).sum())
            loss = float(losses.detach().mean())
        else:  # an empty Poisson batch still releases a noisy update (skipping it would leak the batch size)
            summed = {p: torch.zeros_like(p) for p in self.private_params}
            unclipped, loss = 0, float("nan")
        std = self.noise_multiplier * self.sensitivity(bound)
        for p in self.private_params:
            grad = summed.pop(p)
            grad.add_(_generate_noise(std=std, reference=grad, generator=self.noise_generator))
            p.grad = grad.div_(self.expected_batch)
        embedding = None
        if self.features is not None:
            with torch.no_grad():
                feats = self.features(x, y)
                total = feats.sum(0).mul_(bound)
                total.add_(_generate_noise(std=std, reference=total, generator=self.noise_generator))
                embedding = total.div_(bound * self.expected_batch)
        self.rule.update(unclipped, len(x), self.noise_generator)
        return loss, embedding

    def batches(self, n: int, epochs: int, generator: torch.Generator):
        """Poisson batches (index tensors) for ``epochs`` epochs of ``plan.steps_per_epoch`` steps."""
        sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=self.plan.sample_rate,
                                                generator=generator, steps=self.plan.steps_per_epoch)
        for _ in range(epochs):
            yield [torch.as_tensor(idx, dtype=torch.long) for idx in sampler]
