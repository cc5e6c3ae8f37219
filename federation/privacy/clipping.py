"""Clip-bound rules for DP-SGD and the Opacus optimizers that apply them.

- ``fixed``: a constant bound C.
- ``adaptive``: the privatized quantile rule of Andrew et al. (2021), with Opacus's
  ``AdaClipDPOptimizer`` parameters: after each step C <- C * exp(-eta * (b~ - gamma)), where b~
  is the fraction of the batch left unclipped, counted with Gaussian noise of std
  ``unclipped_num_std`` (sigma_b). The gradient noise is reduced to
  sigma_g = (sigma^-2 - (2 sigma_b)^-2)^-1/2 so that the pair of releases costs exactly the
  nominal sigma, which is what the accountant is given. That identity (their Theorem 1) needs the
  count to have sensitivity 1/2, so each record contributes 1[unclipped] - 1/2 (as in the
  authors' TF Privacy quantile query); a plain 0/1 count has sensitivity 1 and would make the
  true noise multiplier (sigma_g^-2 + sigma_b^-2)^-1/2, below the recorded sigma. The fraction
  is taken over the *expected* batch size, so it does not reveal the Poisson batch size.
- ``median-nonprivate``: the reference code's rule, C = median of the batch's un-clipped
  per-sample gradient norms. C then depends on the private batch: no formal guarantee.
"""
from __future__ import annotations

import math

import torch
from opacus.optimizers import AdaClipDPOptimizer, DPOptimizer
from opacus.optimizers.optimizer import _generate_noise


def adjusted_noise_multiplier(sigma: float, unclipped_num_std: float) -> float:
    """Gradient noise multiplier of the adaptive rule (Andrew et al., Theorem 1)."""
    if sigma == 0:
        return 0.0
    return (sigma ** -2 - (2 * unclipped_num_std) ** -2) ** -0.5


class ClipRule:
    """Chooses the bound for each batch and updates it after the step."""

    mode = "fixed"

    def __init__(self, bound: float):
        self.current = float(bound)

    def bound(self, norms: torch.Tensor) -> float:
        return self.current

    def update(self, unclipped: int, batch_size: int, generator: torch.Generator | None) -> None:
        pass


class MedianRule(ClipRule):
    mode = "median-nonprivate"

    def bound(self, norms: torch.Tensor) -> float:
        if len(norms):
            self.current = float(norms.median())
        return self.current


class AdaptiveRule(ClipRule):
    mode = "adaptive"

    def __init__(self, bound: float, target_quantile: float, lr: float, min_bound: float, max_bound: float,
                 unclipped_num_std: float, expected_batch_size: float):
        super().__init__(min(max(bound, min_bound), max_bound))
        self.target_quantile = target_quantile
        self.lr = lr
        self.min_bound, self.max_bound = min_bound, max_bound
        self.unclipped_num_std = unclipped_num_std
        self.expected_batch_size = expected_batch_size

    def update(self, unclipped: int, batch_size: int, generator: torch.Generator | None) -> None:
        self.current = self.next_bound(self.current, unclipped, batch_size, count_noise(self.unclipped_num_std,
                                                                                        generator))

    def next_bound(self, bound: float, unclipped: float, batch_size: int, noise: float) -> float:
        fraction = centered_fraction(unclipped, batch_size, noise, self.expected_batch_size)
        return min(max(bound * math.exp(-self.lr * (fraction - self.target_quantile)), self.min_bound),
                   self.max_bound)


def count_noise(std: float, generator: torch.Generator | None) -> float:
    """One draw of the unclipped count's Gaussian noise, from the stream of the gradient noise."""
    return float(_generate_noise(std=std, reference=torch.zeros(()), generator=generator))


def centered_fraction(unclipped: float, batch_size: int, noise: float, expected_batch_size: float) -> float:
    """Noisy unclipped fraction from the sensitivity-1/2 count sum_i (1[unclipped_i] - 1/2) + noise."""
    return (unclipped - batch_size / 2 + noise) / expected_batch_size + 0.5


class ExpectedBatchAdaClipDPOptimizer(AdaClipDPOptimizer):
    """Opacus's adaptive optimizer (hooks/functorch modes) with the count of ``AdaptiveRule``:
    centred (sensitivity 1/2) and taken over the expected batch size. ``unclipped_num`` already
    carries Opacus's noise of std ``unclipped_num_std``; ``sample_size`` is the batch size."""

    def update_max_grad_norm(self):
        fraction = centered_fraction(float(self.unclipped_num), int(self.sample_size), 0.0, self.expected_batch_size)
        self.max_grad_norm *= math.exp(-self.clipbound_learning_rate * (fraction - self.target_unclipped_quantile))
        self.max_grad_norm = min(max(self.max_grad_norm, self.min_clipbound), self.max_clipbound)

    def release_empty_batch_count(self, generator: torch.Generator | None) -> None:
        """An empty Poisson batch releases its count too: noise alone, and the bound moves by it, exactly as
        ``AdaptiveRule.update(0, 0, ...)`` does in the bk and ghost modes (skipping it would leak that the
        batch was empty)."""
        self.unclipped_num, self.sample_size = count_noise(self.unclipped_num_std, generator), 0
        self.update_max_grad_norm()


class MedianClipDPOptimizer(DPOptimizer):
    """Opacus's optimizer with the non-private median bound (hooks/functorch modes)."""

    def clip_and_accumulate(self):
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in self.grad_samples], dim=1).norm(2, dim=1)
        if len(norms):
            self.max_grad_norm = float(norms.median())
        super().clip_and_accumulate()
