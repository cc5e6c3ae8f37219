"""White-box latent fit: the best reconstruction of a record a decoder can produce,

    z* = argmin_z ||x - D(z)||^2 + lambda * ||z||^2,

batched, from several restarts. Each restart starts at one of the prior samples that best explain
the record (a shared bank of prior samples is decoded once), and is refined with Adam. With
``precision="bf16"`` the decoder runs under CPU autocast to bfloat16 during the refinement (about twice
as fast); the bank and the final objective, reconstruction and distance of the latent found are
evaluated in float32 either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from federation.precision import forward_precision


@dataclass
class LatentFit:
    latents: torch.Tensor  # (n, d) the best latent per record
    reconstructions: torch.Tensor  # (n, pixels)
    objective: torch.Tensor  # (n,) ||x - D(z*)||^2 + lambda ||z*||^2
    distance: torch.Tensor  # (n,) ||x - D(z*)||_2


def _pairwise_sq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ y.T + y.pow(2).sum(1)).clamp_min_(0)


def fit_latents(decoder: nn.Module, records: torch.Tensor, latent_dim: int, generator: torch.Generator, *,
                lam: float = 0.01, init: int = 1024, restarts: int = 3, steps: int = 60, lr: float = 0.05,
                batch: int = 512, precision: str = "fp32") -> LatentFit:
    """``records``: (n, ...) images in [0, 1]; returns the best fit per record."""
    x_all = records.flatten(1).float()
    bank_z = torch.randn(init, latent_dim, generator=generator)
    with torch.no_grad():
        bank_x = decoder(bank_z).flatten(1)
    restarts = min(restarts, init)
    outs = []
    for start in range(0, len(x_all), batch):
        x = x_all[start:start + batch]
        with torch.no_grad():
            cost = _pairwise_sq(x, bank_x) + lam * bank_z.pow(2).sum(1)
            best = cost.topk(restarts, dim=1, largest=False).indices  # (b, restarts)
        z = bank_z[best].reshape(-1, latent_dim).clone().requires_grad_(True)
        target = x.repeat_interleave(restarts, dim=0)
        opt = torch.optim.Adam([z], lr=lr)
        for _ in range(steps):
            with forward_precision(precision):
                loss = _objective(decoder, z, target, lam)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
        with torch.no_grad():
            final = _objective(decoder, z, target, lam).view(-1, restarts)
            pick = final.argmin(1)
            rows = torch.arange(len(x)) * restarts + pick
            z_best = z.detach()[rows]
            recon = decoder(z_best).flatten(1)
            outs.append((z_best, recon, final.gather(1, pick[:, None]).squeeze(1), (x - recon).norm(dim=1)))
    z, recon, obj, dist = (torch.cat(t) for t in zip(*outs))
    return LatentFit(z, recon, obj, dist)


def _objective(decoder: nn.Module, z: torch.Tensor, target: torch.Tensor, lam: float) -> torch.Tensor:
    return (decoder(z).flatten(1).float() - target).pow(2).sum(1) + lam * z.pow(2).sum(1)
