"""Reference decoders for calibrated attacks: the target's recipe (architecture spec, epochs,
batch size, learning rate, KL weight, LCD penalty) on population data the client never held.

The recipe is assumed public (Kerckhoffs): the adversary knows how clients train, not what they
train on. DP noise is not replayed in the reference: a reference is a noise-free model of how hard
each record is for this architecture and recipe, which is what the calibration subtracts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from federation.models import VAE
from federation.precision import adam
from federation.training import train_epochs


@dataclass
class ReferenceRecipe:
    epochs: int
    batch_size: int = 128
    lr: float = 1e-3
    lambda_kl: float = 1.0
    lcd_lambda: float = 0.0
    precision: str = "fp32"


def train_reference_decoder(spec: dict, population: torch.Tensor, recipe: ReferenceRecipe,
                            generator: torch.Generator) -> nn.Module:
    """A VAE of the target's architecture trained on ``population``; returns its decoder, frozen."""
    vae = VAE(spec, generator)
    train_epochs(vae, adam(vae.parameters(), recipe.lr), population, recipe.epochs, recipe.batch_size,
                 recipe.lambda_kl, generator, lcd_lambda=recipe.lcd_lambda, precision=recipe.precision)
    decoder = vae.decoder.eval()
    decoder.requires_grad_(False)
    return decoder
