"""Local VAE training: the loop every client, the server and the centralized reference share."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from federation.models import VAE, vae_loss
from federation.precision import forward_precision
from federation.privacy.lcd import lcd_penalty


@dataclass
class TrainSettings:
    rounds: int = 10
    local_epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    lambda_kl: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 (federation.precision): the forward matmuls' precision


def to_tensor(images) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]."""
    return torch.as_tensor(images).float().div_(255.0).unsqueeze(1)


def train_epochs(vae: VAE, optimizer: torch.optim.Optimizer, data: torch.Tensor, epochs: int,
                 batch_size: int, lambda_kl: float, generator: torch.Generator,
                 prox_mu: float = 0.0, prox_ref: dict | None = None, lcd_lambda: float = 0.0,
                 precision: str = "fp32") -> float:
    """Shuffled mini-batch training; returns the mean loss of the last epoch. ``generator`` draws the
    batch order and the reparameterization noise.

    With ``prox_mu > 0`` the FedProx term mu/2 * ||w - w_ref||^2 is added (w_ref = ``prox_ref``);
    with ``lcd_lambda > 0`` the LCD-VAE decoder gradient penalty. ``precision``: see ``federation.precision``
    (the loss is always reduced in float32)."""
    vae.train()
    n = len(data)
    last = 0.0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        total, batches = 0.0, 0
        for start in range(0, n, batch_size):
            x = data.index_select(0, order[start:start + batch_size])  # a gather, several times faster than data[idx]
            with forward_precision(precision):
                recon, mu, logvar, z = vae.forward_with_latent(x, generator)
                penalty = lcd_penalty(vae.decoder, z, generator) if lcd_lambda > 0 else None
            loss = vae_loss(x, recon.float(), mu.float(), logvar.float(), lambda_kl)
            if penalty is not None:
                loss = loss + lcd_lambda * penalty.float()
            if prox_mu > 0 and prox_ref is not None:
                prox = sum(((p - prox_ref[name]) ** 2).sum() for name, p in vae.named_parameters())
                loss = loss + 0.5 * prox_mu * prox
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
        last = total / max(batches, 1)
    return last


@torch.no_grad()
def encode_mu(vae: VAE, data: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    vae.eval()
    return torch.cat([vae.encoder(data[i:i + batch_size])[0] for i in range(0, len(data), batch_size)])


@torch.no_grad()
def decode(decoder: torch.nn.Module, z: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    decoder.eval()
    return torch.cat([decoder(z[i:i + batch_size]) for i in range(0, len(z), batch_size)])
