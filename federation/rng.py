"""Every random draw of a run comes from a generator derived from (seed, stream, ...).

A client's streams are derived from (seed, stream, client, round), the server's from (seed, stream,
round): the order in which an engine runs clients, running them in parallel, or rebuilding a client
from its saved state in a fresh process changes nothing. Nothing in the library seeds or reads torch's
global generator; model parameters are initialized from an explicit generator (``init_parameters``).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import _SpectralNorm

# stream ids: one per purpose, so that adding a draw to one purpose moves no other
CLIENT_INIT = 1  # a client's VAE initialization (seed, CLIENT_INIT, client)
CLIENT_TRAIN = 2  # batch order, Poisson sampling, reparameterization noise, LCD probes (+ client, round)
SERVER_INIT = 3  # the server's global VAE (seed, SERVER_INIT)
SERVER_ROUND = 4  # latent sampling and global training in a round (+ round)
CLIENT_DP_NOISE = 5  # DP-SGD noise and the adaptive rule's noisy count (+ client, round)
PARTICIPATION = 6  # which clients a round selects (+ round, client)
DOMAIN_CNN_INIT = 7
DOMAIN_CNN_TRAIN = 8
PRIOR_SAMPLES = 9
CLIENT_FIGURE = 10
STRAGGLERS = 11  # the in-process engine's simulated reply delays (+ round, client)
LATENT_GMM = 12  # a client's latent GMM fit (+ client, round)
CODE_ANCHOR = 13  # FedHypeVAE: the public anchor of a client's code (+ client)
MMD_FEATURES = 14  # FedHypeVAE: a client's random Fourier features of the MMD kernel (+ client)


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator whose seed is a fixed function of ``parts``."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def int_seed(generator: torch.Generator) -> int:
    """A 31-bit integer drawn from ``generator`` (for libraries that take an integer seed)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


@torch.no_grad()
def init_parameters(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Initialize every layer as torch's own ``reset_parameters`` does, but from ``generator``.

    Layers: ``nn.Linear``, ``nn.Conv2d``, ``nn.ConvTranspose2d`` (kaiming-uniform weights, uniform
    biases in +-1/sqrt(fan_in)); spectral-norm parametrizations get fresh power-iteration vectors."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            weight = _raw_weight(layer)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
            if layer.bias is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
        elif list(layer.parameters(recurse=False)) and not isinstance(layer, nn.utils.parametrize.ParametrizationList):
            raise TypeError(f"init_parameters does not know how to initialize {type(layer).__name__}")
    for layer in module.modules():
        for parametrization in _spectral_norms(layer):
            _reset_spectral_vectors(layer, parametrization, generator)
    return module


def _raw_weight(layer: nn.Module) -> torch.Tensor:
    if nn.utils.parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


def _spectral_norms(layer: nn.Module):
    if nn.utils.parametrize.is_parametrized(layer, "weight"):
        return [p for p in layer.parametrizations.weight if isinstance(p, _SpectralNorm)]
    return []


def _reset_spectral_vectors(layer: nn.Module, sn: _SpectralNorm, generator: torch.Generator) -> None:
    """What ``_SpectralNorm.__init__`` does with the global generator: random unit u and v, then 15
    power iterations on the (just initialized) weight."""
    if not hasattr(sn, "_u"):
        return
    weight_mat = sn._reshape_weight_to_matrix(layer.parametrizations.weight.original)
    h, w = weight_mat.shape
    u = torch.randn(h, generator=generator, dtype=weight_mat.dtype)
    v = torch.randn(w, generator=generator, dtype=weight_mat.dtype)
    sn._u.copy_(nn.functional.normalize(u, dim=0, eps=sn.eps))
    sn._v.copy_(nn.functional.normalize(v, dim=0, eps=sn.eps))
    sn._power_method(weight_mat, 15)
