"""LCD-VAE: Lipschitz-constrained decoders (no formal DP guarantee).

- ``lcd``: a gradient penalty on the decoder at interpolated latents,
  z~ = a*z + (1-a)*z[perm], penalty = lambda * mean((||d/dz~ sum D(z~)|| - 1)^2).
- ``lcd-spectral``: a hard constraint, spectral normalization of every decoder weight
  (``"spectral_norm": true`` in the decoder spec, so the server rebuilds it from the spec).
"""
from __future__ import annotations

import torch


def lcd_penalty(decoder: torch.nn.Module, z: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = len(z)
    a = torch.rand(n, 1, generator=generator)
    perm = torch.randperm(n, generator=generator)
    z_mix = (a * z + (1 - a) * z[perm]).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(decoder(z_mix).sum(), z_mix, create_graph=True)
    return ((grad.norm(2, dim=1) - 1) ** 2).mean()
