"""FedHypeVAE's shared hypernetwork: a code in, a class-conditional decoder and its prior out.

For a code c (``code_dim`` numbers) the hypernetwork H_theta generates every parameter of a conditional
decoder and the class-conditional prior (see ``federation/strategies/fedhypevae.py`` for the design):

- a trunk t(c) = tanh(W_t c + b_t) of width ``hyper_hidden``;
- per decoder layer l, a gain gamma_l(c) and a shift beta_l(c) (one per output unit), read off one
  linear head of t(c); the generated layer is W_l(c) = diag(1 + gamma_l(c)) Wbar_l and
  b_l(c) = (1 + gamma_l(c)) * bbar_l + beta_l(c), where Wbar_l, bbar_l are the hypernetwork's base tensors
  (its output at gamma = beta = 0). Every decoder weight depends on the code, at the cost of one
  number per output unit of the head (a FiLM-style, rank-structured generation), so the hypernetwork
  stays about the size of one decoder plus a head of ``hyper_hidden`` x (2 x units);
- the class-conditional prior N(m_y(c), I), its means m(c) (``num_classes`` x ``latent_dim``) read off
  a second linear head of t(c).

The decoder maps [z, onehot(y)] through the MLP widths of the model spec, reversed (the paper's decoder
2-128-256-512-784, with the label beside z), ReLU between layers, a sigmoid at the end.

Every trainable tensor sits in a plain ``nn.Linear`` applied to a 2-D input, so book-keeping clipping
(``federation.privacy.bookkeeping``) gives exact per-example gradients: the code is fed to the trunk
once per example (the same code in every row), so each example's gradient reaches the trunk and the
heads through its own copy.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from federation.errors import ConfigError
from federation.models import (IMAGE_SHAPE, PIXELS, _int_list, _materialize, _positive_int, build_decoder, load_decoder,
                               normalize_spec)
from federation.rng import CODE_ANCHOR, seeded_generator

ARCH = "film-hypernetwork"
NUM_CLASSES = 10
HYPERNETWORK_KIND = "hypernetwork"  # the downlink: the hypernetwork itself
UPDATE_KIND = "hypernetwork_update"  # the uplink: a client's trained minus received hypernetwork
SPEC_KEYS = ("arch", "latent_dim", "hidden", "num_classes", "code_dim", "hyper_hidden")


def normalize_hyper_spec(spec) -> dict:
    """A hypernetwork spec (what the downlink and every update carry), checked and filled in."""
    if not isinstance(spec, dict):
        raise ConfigError(f"a hypernetwork spec must be a mapping, got {type(spec).__name__}")
    if spec.get("arch", ARCH) != ARCH:
        raise ConfigError(f"a hypernetwork spec has arch {ARCH!r}, not {spec.get('arch')!r}")
    extra = set(spec) - set(SPEC_KEYS)
    if extra:
        raise ConfigError(f"hypernetwork spec has unknown keys {sorted(extra)}")
    return {"arch": ARCH, "latent_dim": _positive_int(spec.get("latent_dim", 2), "hypernetwork latent_dim"),
            "hidden": _int_list(spec.get("hidden", [512, 256, 128]), "hypernetwork hidden"),
            "num_classes": _positive_int(spec.get("num_classes", NUM_CLASSES), "hypernetwork num_classes"),
            "code_dim": _positive_int(spec.get("code_dim", 8), "strategy.code_dim"),
            "hyper_hidden": _positive_int(spec.get("hyper_hidden", 64), "strategy.hyper_hidden")}


def decoder_widths(spec: dict) -> list[tuple[int, int]]:
    """(in, out) of each generated decoder layer."""
    widths = [spec["latent_dim"] + spec["num_classes"], *reversed(spec["hidden"]), PIXELS]
    return list(zip(widths[:-1], widths[1:]))


class FiLMHypernetwork(nn.Module):
    """The shared hypernetwork H_theta. ``FiLMHypernetwork(spec, generator)`` initializes every tensor
    from ``generator``; ``FiLMHypernetwork(spec)`` is all zeros, to load a state dict into."""

    def __init__(self, spec: dict, generator: torch.Generator | None = None, materialize: bool = True):
        super().__init__()
        self.spec = normalize_hyper_spec(spec)
        s = self.spec
        self.units = [out for _, out in decoder_widths(s)]
        with torch.device("meta"):
            self.trunk = nn.Linear(s["code_dim"], s["hyper_hidden"])
            self.film = nn.Linear(s["hyper_hidden"], 2 * sum(self.units))
            self.prior = nn.Linear(s["hyper_hidden"], s["num_classes"] * s["latent_dim"])
            self.base = nn.ModuleList(nn.Linear(i, o) for i, o in decoder_widths(s))
        if materialize:  # else the tensors stay on the meta device: shapes and dtypes only
            _materialize(self, generator)

    @property
    def code_dim(self) -> int:
        return self.spec["code_dim"]

    def generate(self, codes: torch.Tensor):
        """codes (B, code_dim) -> (gains per layer, shifts per layer, prior means (B, classes, latent))."""
        t = torch.tanh(self.trunk(codes))
        film = self.film(t).split(self.units * 2, dim=1)
        means = self.prior(t).view(len(codes), self.spec["num_classes"], self.spec["latent_dim"])
        return film[:len(self.units)], film[len(self.units):], means

    def decode(self, z: torch.Tensor, onehot: torch.Tensor, gains, shifts) -> torch.Tensor:
        """The generated decoder on [z, onehot(y)]: images (B, 1, 28, 28). ``gains``/``shifts`` hold one row
        per example (or a single row, broadcast)."""
        h = torch.cat([z, onehot], 1)
        last = len(self.base) - 1
        for l, layer in enumerate(self.base):
            h = layer(h) * (1 + gains[l]) + shifts[l]
            h = torch.sigmoid(h) if l == last else F.relu(h)
        return h.view(len(h), *IMAGE_SHAPE)

    def jacobian_sq_norm(self, code: torch.Tensor) -> torch.Tensor:
        """||d(generated decoder weights, biases and prior means)/d code||_F^2 at one code, exactly.

        With J_t = diag(1 - t^2) W_t the trunk's Jacobian and J_g, J_b the rows of W_film J_t for a gain and
        a shift: row r of W_l(c) = (1 + g_r) Wbar_l[r] has Jacobian Wbar_l[r] (x) J_g[r], of squared norm
        ||Wbar_l[r]||^2 ||J_g[r]||^2; b_l[r] has Jacobian bbar_l[r] J_g[r] + J_b[r]; the prior means W_prior J_t."""
        t = torch.tanh(self.trunk(code.view(1, -1)))[0]
        j_t = (1 - t ** 2).unsqueeze(1) * self.trunk.weight  # hyper_hidden x code_dim
        j_film = self.film.weight.mm(j_t).split(self.units * 2, dim=0)
        total = self.prior.weight.mm(j_t).pow(2).sum()
        for l, layer in enumerate(self.base):
            j_gain, j_shift = j_film[l], j_film[len(self.units) + l]
            total = total + (layer.weight.pow(2).sum(1) * j_gain.pow(2).sum(1)).sum()
            total = total + (layer.bias.unsqueeze(1) * j_gain + j_shift).pow(2).sum()
        return total


def decoder_spec(spec: dict) -> dict:
    """The plain ``mlp`` decoder spec a generated decoder materializes to (``generated_decoder``)."""
    return normalize_spec({"arch": "mlp", "latent_dim": spec["latent_dim"], "hidden": list(spec["hidden"])})


@torch.no_grad()
def generated_decoder(hyper: FiLMHypernetwork, code: torch.Tensor, label: int) -> nn.Module:
    """The decoder the hypernetwork generates for ``code`` and class ``label``, as a plain ``mlp`` decoder
    u -> image with prior N(0, I): the label's column of the first layer and the class prior's mean m_y(c)
    are folded into the first bias (z = u + m_y(c)), every gain and shift into the layers. It computes
    exactly ``hyper.decode(u + m_y(c), onehot(y), ...)``."""
    gains, shifts, means = hyper.generate(code.view(1, -1).to(hyper.trunk.weight.dtype))
    d = hyper.spec["latent_dim"]
    state = {}
    linears = [i for i, m in enumerate(build_decoder(decoder_spec(hyper.spec), None)) if isinstance(m, nn.Linear)]
    for l, (index, layer) in enumerate(zip(linears, hyper.base)):
        scale = 1 + gains[l][0]
        weight, bias = layer.weight, layer.bias
        if l == 0:
            bias = bias + weight[:, d + label] + weight[:, :d] @ means[0, label]
            weight = weight[:, :d]
        state[f"{index}.weight"] = (scale.unsqueeze(1) * weight).clone()
        state[f"{index}.bias"] = (scale * bias + shifts[l][0]).clone()
    decoder = load_decoder(decoder_spec(hyper.spec), state)
    decoder.eval()
    decoder.requires_grad_(False)
    return decoder


def hypernetwork_tensors(spec: dict) -> dict[str, torch.Tensor]:
    """The tensors (shapes and dtypes, on the meta device: nothing allocated) a hypernetwork of ``spec`` holds:
    what a ``hypernetwork`` downlink and a ``hypernetwork_update`` uplink must carry, nothing more."""
    return FiLMHypernetwork(spec, materialize=False).state_dict()


def load_hypernetwork(spec: dict, state: dict[str, torch.Tensor]) -> FiLMHypernetwork:
    hyper = FiLMHypernetwork(spec)
    hyper.load_state_dict(state)
    return hyper


def onehot(labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    return F.one_hot(labels.long(), num_classes).float()


def code_anchor(seed: int, client: int, code_dim: int) -> torch.Tensor:
    """The public anchor of a client's code, a random unit vector: the client's private code starts there
    and is pulled back towards it while it trains. Anyone who knows the run's seed can form it (the server
    does, for mixture synthesis); the trained code stays private. The neutral meta-code is the origin,
    at distance 1 from every anchor."""
    row = torch.randn(code_dim, generator=seeded_generator(seed, CODE_ANCHOR, client))
    return row / row.norm().clamp_min(1e-12)


@torch.no_grad()
def synthesize(hyper: FiLMHypernetwork, codes: torch.Tensor, counts: list[list[int]], classes: list[int],
               generator: torch.Generator, batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-conditional synthesis: ``counts[j][i]`` samples of class ``classes[i]`` from code ``codes[j]``,
    z ~ N(m_y(code), I). Returns (images, class labels), in code order, then class order."""
    hyper.eval()
    xs, ys = [], []
    for code, per_class in zip(codes, counts):
        gains, shifts, means = hyper.generate(code.view(1, -1))
        for y, n in zip(classes, per_class):
            if n <= 0:
                continue
            labels = torch.full((n,), y, dtype=torch.long)
            z = means[0, y] + torch.randn(n, hyper.spec["latent_dim"], generator=generator)
            xs += [hyper.decode(z[i:i + batch], onehot(labels[i:i + batch], hyper.spec["num_classes"]), gains, shifts)
                   for i in range(0, n, batch)]
            ys.append(labels)
    return torch.cat(xs), torch.cat(ys)
