"""A class-conditional MMD between real and synthetic batches, through an explicit feature map.

The kernel is k((x, y), (x', y')) = exp(-||x - x'||^2 / (2 l^2)) * [y = y'] (a Gaussian kernel on pixels
times a label match), approximated by D random Fourier frequencies (Rahimi and Recht 2007):
phi(x) = [cos(W x), sin(W x)] / sqrt(D), W ~ N(0, I / l^2), and phi(x, y) = phi(x) (x) onehot(y). Every
feature vector has norm exactly 1, so a record's contribution to a batch's mean embedding is bounded:
under DP-SGD the real batch's embedding sum is released with the gradient, in one Gaussian mechanism
(``federation.privacy.dp_hyper``). MMD^2 = ||mean phi(real) - mean phi(synthetic)||^2.
"""
from __future__ import annotations

import math

import torch

from federation.models import PIXELS


class RandomFeatures:
    def __init__(self, frequencies: int, bandwidth: float, num_classes: int, generator: torch.Generator):
        self.frequencies, self.num_classes = frequencies, num_classes
        self.omega = torch.randn(PIXELS, frequencies, generator=generator) / bandwidth

    @property
    def dim(self) -> int:
        return 2 * self.frequencies * self.num_classes

    def __call__(self, images: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """(B, dim) unit-norm features of (image, label) pairs."""
        proj = images.flatten(1).mm(self.omega)
        phi = torch.cat([proj.cos(), proj.sin()], 1) / math.sqrt(self.frequencies)
        return (onehot.unsqueeze(2) * phi.unsqueeze(1)).flatten(1)


def mmd_squared(real_mean: torch.Tensor, synthetic_features: torch.Tensor) -> torch.Tensor:
    """||real mean embedding - synthetic mean embedding||^2 (the real one given, e.g. released with noise)."""
    return (real_mean - synthetic_features.mean(0)).pow(2).sum()
