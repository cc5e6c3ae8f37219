"""FedHypeVAE from the server's seat: the decoders a client's trained hypernetwork generates at a code the
adversary searches for, and an attack on the hypernetwork updates themselves.

**Code search.** A client's code is private, but it starts at a public anchor a_k and is pulled back
towards it while it trains. The adversary starts at a_k and minimizes, jointly over one code c and one
latent u_i per record,

    mean_i ||D_{c, y_i}(u_i) - x_i||^2 + lambda ||u_i||^2 + w ||c - a_k||^2,

w being the anchor weight clients train with (the recipe is public), over candidate records (x_i, y_i) of the client's classes (members and non-members alike: it does not know
which are which), D_{c, y} being the decoder generated for code c and class y with its class prior
N(m_y(c), I) shifted to N(0, I). At the code found, every generated decoder is a plain MLP decoder
(``federation.hypernetwork.generated_decoder``), and every decoder attack of the audit applies to it, class
by class (``score_by_class``, ``fit_by_class``).

**Update alignment.** Client k's update Delta_{k,r} is what its round r did to the hypernetwork theta_r the
server sent it: a sum of gradient steps on its records (Adam-scaled; clipped and noised under DP). A
record's gradient g_x of its latent-fit loss at theta_r (at the searched code) points along -Delta more
when the record was trained on: the score is the mean over the client's rounds of cos(g_x, -Delta_{k,r}).
Inner products and norms come from book-keeping over the hypernetwork's Linear layers
(``LinearBookkeeper``): no per-record gradient is materialized.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from attacks.latent_fit import LatentFit, fit_latents
from federation.hypernetwork import FiLMHypernetwork, generated_decoder, load_hypernetwork, onehot
from federation.privacy.bookkeeping import LinearBookkeeper


class GeneratedDecoders:
    """The decoders one hypernetwork generates at one code, by class (built on first use)."""

    def __init__(self, hyper: FiLMHypernetwork, code: torch.Tensor):
        self.hyper, self.code = hyper, code.detach()
        self._made: dict[int, nn.Module] = {}

    @property
    def latent_dim(self) -> int:
        return self.hyper.spec["latent_dim"]

    def __call__(self, label: int) -> nn.Module:
        if label not in self._made:
            self._made[label] = generated_decoder(self.hyper, self.code, int(label))
        return self._made[label]


def _classes(labels: np.ndarray) -> list[int]:
    return sorted(int(c) for c in np.unique(labels))


def score_by_class(make_attack, decoders: GeneratedDecoders, records: torch.Tensor, labels: np.ndarray,
                   generator: torch.Generator) -> np.ndarray:
    """A decoder attack's scores, each record scored against the decoder of its own class."""
    labels = np.asarray(labels)
    scores = np.zeros(len(records))
    for c in _classes(labels):
        mask = labels == c
        scores[mask] = make_attack().fit(decoders(c), decoders.latent_dim, generator).score(records[torch.from_numpy(mask)])
    return scores


def fit_by_class(decoders: GeneratedDecoders, records: torch.Tensor, labels: np.ndarray, generator: torch.Generator,
                 **options) -> LatentFit:
    """``fit_latents`` with each record fitted by the decoder of its own class, in the records' order."""
    labels = np.asarray(labels)
    n, parts = len(records), []
    for c in _classes(labels):
        index = np.flatnonzero(labels == c)
        parts.append((index, fit_latents(decoders(c), records[torch.from_numpy(index)], decoders.latent_dim, generator,
                                         **options)))
    out = []
    for field in ("latents", "reconstructions", "objective", "distance"):
        first = getattr(parts[0][1], field)
        full = first.new_zeros((n, *first.shape[1:]))
        for index, fit in parts:
            full[torch.from_numpy(index)] = getattr(fit, field)
        out.append(full)
    return LatentFit(*out)


def search_code(hyper: FiLMHypernetwork, anchor: torch.Tensor, records: torch.Tensor, labels: np.ndarray,
                generator: torch.Generator, *, lam: float, init: int, steps: int, anchor_weight: float,
                lr: float = 0.05) -> torch.Tensor:
    """The code that best explains ``records`` under ``hyper``, searched from ``anchor`` (see the module)."""
    start = fit_by_class(GeneratedDecoders(hyper, anchor), records, labels, generator, lam=lam, init=init, restarts=1,
                         steps=0)
    code = anchor.detach().clone().requires_grad_(True)
    latents = start.latents.clone().requires_grad_(True)
    x, y = records.flatten(1).float(), torch.as_tensor(labels, dtype=torch.long)
    y1h = onehot(y, hyper.spec["num_classes"])
    optimizer = torch.optim.Adam([code, latents], lr=lr)
    for _ in range(steps):
        gains, shifts, means = hyper.generate(code.view(1, -1))
        recon = hyper.decode(latents + means[0, y], y1h, gains, shifts).flatten(1)
        loss = ((recon - x).pow(2).sum(1) + lam * latents.pow(2).sum(1)).mean() + anchor_weight * (code - anchor).pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return code.detach()


def update_alignment(rounds: list, code: torch.Tensor, records: torch.Tensor, labels: np.ndarray,
                     generator: torch.Generator, *, lam: float, init: int, steps: int, batch: int = 256) -> np.ndarray:
    """Mean over a client's shared rounds (``SharedDecoder``s with ``start`` and ``update``) of
    cos(g_x, -Delta): g_x the gradient, with respect to the hypernetwork the round started from, of record x's
    latent-fit loss at ``code``."""
    labels = np.asarray(labels)
    total = np.zeros(len(records))
    for shared in rounds:
        start = load_hypernetwork(shared.start.spec, shared.start.state_dict())  # trainable, for the gradients
        params = dict(start.named_parameters())
        direction = {params[k]: -v for k, v in shared.update.items()}
        update_norm = float(torch.sqrt(sum(v.double().pow(2).sum() for v in shared.update.values())))
        fit = fit_by_class(GeneratedDecoders(start, code), records, labels, generator, lam=lam, init=init, restarts=1,
                           steps=steps)
        keeper = LinearBookkeeper(start)
        cos = []
        for i in range(0, len(records), batch):
            x, u = records[i:i + batch].flatten(1).float(), fit.latents[i:i + batch]
            y = torch.as_tensor(labels[i:i + batch], dtype=torch.long)
            with keeper.recording():
                gains, shifts, means = start.generate(code.view(1, -1).expand(len(x), -1))  # a code row per record
                recon = start.decode(u + means[torch.arange(len(x)), y], onehot(y, start.spec["num_classes"]),
                                     gains, shifts).flatten(1)
                backprops = keeper.backprops((recon - x).pow(2).sum(1) + lam * u.pow(2).sum(1))
            norms = keeper.per_sample_norms(backprops, len(x)).double()
            dots = keeper.per_sample_dots(backprops, direction, len(x))
            cos.append((dots / (norms * update_norm).clamp_min(1e-30)).numpy())
        total += np.concatenate(cos)
    return total / max(len(rounds), 1)
