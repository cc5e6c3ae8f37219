"""VAE architectures behind a small registry. Each architecture is described by a JSON-serializable
spec; the server rebuilds a decoder from its spec alone (``build_decoder``)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from federation.errors import ConfigError
from federation.rng import init_parameters

IMAGE_SHAPE = (1, 28, 28)
PIXELS = 28 * 28


def _positive_int(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def _int_list(value, what: str, length: int | None = None) -> list[int]:
    if not isinstance(value, list) or not value or (length is not None and len(value) != length):
        need = f"{length} " if length else "a non-empty list of "
        raise ConfigError(f"{what} must be {need}positive integers, got {value!r}")
    return [_positive_int(v, what) for v in value]


def _flag(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false, got {value!r}")
    return value


def _spectral(decoder: nn.Module, spec: dict) -> nn.Module:
    """LCD-VAE's hard constraint: spectral normalization of every decoder weight."""
    if spec.get("spectral_norm"):
        for module in decoder.modules():
            if isinstance(module, (nn.Linear, nn.ConvTranspose2d)):
                nn.utils.parametrizations.spectral_norm(module)
    return decoder


# ---------------------------------------------------------------- MLP (the paper's model)
def _mlp_spec(spec: dict) -> dict:
    return {"arch": "mlp", "latent_dim": _positive_int(spec.get("latent_dim", 2), "model.latent_dim"),
            "hidden": _int_list(spec.get("hidden", [512, 256, 128]), "model.hidden"),
            "spectral_norm": _flag(spec.get("spectral_norm", False), "model.spectral_norm")}


def _mlp_encoder(spec: dict) -> nn.Module:
    return MLPEncoder(spec["hidden"], spec["latent_dim"])


def _mlp_decoder(spec: dict) -> nn.Module:
    layers: list[nn.Module] = []
    width = spec["latent_dim"]
    for h in reversed(spec["hidden"]):
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers += [nn.Linear(width, PIXELS), nn.Sigmoid(), nn.Unflatten(1, IMAGE_SHAPE)]
    return _spectral(nn.Sequential(*layers), spec)


class MLPEncoder(nn.Module):
    def __init__(self, hidden: list[int], latent_dim: int, in_features: int = PIXELS):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.mu = nn.Linear(width, latent_dim)
        self.logvar = nn.Linear(width, latent_dim)

    def forward(self, x):
        h = self.body(x)
        return self.mu(h), self.logvar(h)


# ---------------------------------------------------------------- convolutional VAE
def _conv_spec(spec: dict) -> dict:
    return {"arch": "conv", "latent_dim": _positive_int(spec.get("latent_dim", 2), "model.latent_dim"),
            "channels": _int_list(spec.get("channels", [32, 64]), "model.channels", length=2),
            "fc": _positive_int(spec.get("fc", 256), "model.fc"),
            "spectral_norm": _flag(spec.get("spectral_norm", False), "model.spectral_norm")}


class ConvEncoder(nn.Module):
    def __init__(self, channels: list[int], fc: int, latent_dim: int):
        super().__init__()
        c1, c2 = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 4, 2, 1), nn.ReLU(),  # 28 -> 14
            nn.Conv2d(c1, c2, 4, 2, 1), nn.ReLU(),  # 14 -> 7
            nn.Flatten(), nn.Linear(c2 * 49, fc), nn.ReLU())
        self.mu = nn.Linear(fc, latent_dim)
        self.logvar = nn.Linear(fc, latent_dim)

    def forward(self, x):
        h = self.body(x)
        return self.mu(h), self.logvar(h)


def _conv_encoder(spec: dict) -> nn.Module:
    return ConvEncoder(spec["channels"], spec["fc"], spec["latent_dim"])


def _conv_decoder(spec: dict) -> nn.Module:
    c1, c2 = spec["channels"]
    return _spectral(nn.Sequential(
        nn.Linear(spec["latent_dim"], spec["fc"]), nn.ReLU(),
        nn.Linear(spec["fc"], c2 * 49), nn.ReLU(), nn.Unflatten(1, (c2, 7, 7)),
        nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.ReLU(),  # 7 -> 14
        nn.ConvTranspose2d(c1, 1, 4, 2, 1), nn.Sigmoid()), spec)  # 14 -> 28


# ---------------------------------------------------------------- registry
ARCHITECTURES: dict[str, tuple[Callable, Callable, Callable]] = {
    "mlp": (_mlp_spec, _mlp_encoder, _mlp_decoder),
    "conv": (_conv_spec, _conv_encoder, _conv_decoder),
}


def normalize_spec(spec: dict) -> dict:
    """Validate a model spec and fill in defaults; unknown keys or architectures are errors."""
    if not isinstance(spec, dict):
        raise ConfigError(f"a model spec must be a mapping, got {type(spec).__name__}")
    arch = spec.get("arch", "mlp")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    normal = ARCHITECTURES[arch][0](spec)
    extra = set(spec) - set(normal)
    if extra:
        raise ConfigError(f"model spec for {arch!r} has unknown keys {sorted(extra)}")
    return normal


def _materialize(module: nn.Module, generator: torch.Generator | None) -> nn.Module:
    """A module built on the meta device gets real (CPU) storage: initialized from ``generator``, or
    zero-filled when the caller loads a state dict next. torch's global generator is never used."""
    module = module.to_empty(device="cpu")
    if generator is None:
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                t.zero_()
        return module
    return init_parameters(module, generator)


def build_decoder(spec: dict, generator: torch.Generator | None = None) -> nn.Module:
    """The decoder of ``spec``: initialized from ``generator``, or all zeros (to load a state dict into)."""
    spec = normalize_spec(spec)
    with torch.device("meta"):
        decoder = ARCHITECTURES[spec["arch"]][2](spec)
    return _materialize(decoder, generator)


def load_decoder(spec: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    decoder = build_decoder(spec)
    decoder.load_state_dict(state)
    return decoder


def reparameterization_noise(mu: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``mu``, drawn from ``generator`` (tests replace this function to
    fix the noise). Torch's global generator is never used: results must not depend on it. Drawn in at
    least float32: a bfloat16 forward (``training.precision``) takes the same draws as a float32 one."""
    if generator is None:
        raise TypeError("the VAE's reparameterization noise needs an explicit torch.Generator")
    return torch.randn(mu.shape, generator=generator, dtype=torch.promote_types(mu.dtype, torch.float32))


class VAE(nn.Module):
    """A VAE whose ``decoder`` is a self-contained module: the only part a client shares.

    ``VAE(spec, generator)`` initializes every parameter from ``generator``; ``VAE(spec)`` is all
    zeros, for loading a state dict into (``load_vae``)."""

    def __init__(self, spec: dict, generator: torch.Generator | None = None):
        super().__init__()
        self.spec = normalize_spec(spec)
        _, make_encoder, make_decoder = ARCHITECTURES[self.spec["arch"]]
        with torch.device("meta"):
            self.encoder = make_encoder(self.spec)
            self.decoder = make_decoder(self.spec)
        _materialize(self, generator)

    @property
    def latent_dim(self) -> int:
        return self.spec["latent_dim"]

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        recon, mu, logvar, _ = self.forward_with_latent(x, generator)
        return recon, mu, logvar

    def forward_with_latent(self, x: torch.Tensor, generator: torch.Generator | None = None,
                            decoder: nn.Module | None = None):
        """(recon, mu, logvar, z). The reparameterization noise comes from ``generator`` (the library
        always passes one); ``decoder`` replaces the own decoder (e.g. an Opacus wrapper of it)."""
        mu, logvar = self.encoder(x)
        eps = reparameterization_noise(mu, generator)
        z = mu + eps * torch.exp(0.5 * logvar)
        return (decoder or self.decoder)(z), mu, logvar, z


def load_vae(spec: dict, state: dict[str, torch.Tensor]) -> VAE:
    vae = VAE(spec)
    vae.load_state_dict(state)
    return vae


def vae_loss_per_sample(x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                        lambda_kl: float) -> torch.Tensor:
    """Summed squared error over pixels + lambda_kl * KL averaged over latent dims, per sample."""
    mse = ((recon - x) ** 2).flatten(1).sum(1)
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).mean(1)
    return mse + lambda_kl * kl


def vae_loss(x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             lambda_kl: float) -> torch.Tensor:
    """The paper's loss: per-sample summed MSE (batch mean) + lambda_kl * KL averaged over batch and
    latent dims. Equal to ``vae_loss_per_sample(...).mean()``; reduced in this order so that non-DP
    runs stay bit-identical across versions."""
    mse = ((recon - x) ** 2).flatten(1).sum(1).mean()
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).mean()
    return mse + lambda_kl * kl
