"""Dirac gradient canaries for the white-box self-audit of DP-SGD, and the auditor that reads them.

The auditor controls one client: its model and some of its records. The model is the client's VAE
plus a probe, an ``nn.Linear`` (pixels -> slots, no bias) that only canaries reach. A canary is a
crafted record: an image that is zero except for one negative pixel, at column j, holding -(k + 1)
(real images lie in [0, 1]). Its per-sample loss is a function of the probe alone, built so that its
per-sample gradient is g * e_k e_j^T: one coordinate (k, j) of the probe, of norm g, and exactly zero
in every VAE parameter. A real record reaches the VAE only, so the probe's coordinates carry nothing
but the canaries' clipped contributions and the mechanism's noise. DP-SGD itself is untouched: the
trainer (``federation.privacy.dp_sgd.DPTrainer``, book-keeping clipping) samples, clips, counts,
adds noise and steps exactly as in a real run.

Canary norm and adaptive clipping. A canary carries the full sensitivity only if its norm is at least
the step's clip bound C_t; it is then clipped to exactly C_t. A norm far above every reachable bound
always counts as "clipped" in the adaptive rule's noisy count, and canaries that are a large part of
the batch would then drag the bound upward, away from the target quantile of the real records. The
white-box auditor knows C_t before each step (the rule's state), so it gives a fraction gamma of its
canaries (gamma = the rule's target quantile) a norm just below C_t (unclipped, contributing
C_t (1 - 1e-5)) and the others 10x the largest bound the rule can reach (clipped, contributing C_t):
the canaries then count as unclipped at the rate the rule aims for, and leave its bound where the
real records put it.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from attacks.self_audit import step_log_likelihood_ratio
from federation.models import PIXELS, VAE

AT_BOUND = 1.0 - 1e-5  # norm of an unclipped canary, as a fraction of the step's clip bound


def canary_coordinates(m: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the probe coordinate each of the m canaries owns."""
    return np.divmod(np.arange(m), PIXELS)


def canary_images(m: int) -> torch.Tensor:
    """The m crafted records, shaped like images: zero but for -(k + 1) at pixel j."""
    rows, cols = canary_coordinates(m)
    images = torch.zeros(m, PIXELS)
    images[np.arange(m), cols] = -torch.as_tensor(rows + 1, dtype=torch.float32)
    return images.view(m, 1, 28, 28)


class DiracCanaryVAE(VAE):
    """The audited client's VAE plus the probe only canaries reach. ``norms[i]`` is canary i's
    gradient norm in the next forward pass (the auditor sets it before each step)."""

    def __init__(self, spec: dict, generator: torch.Generator, m: int):
        super().__init__(spec, generator)
        self.probe = nn.Linear(PIXELS, int(canary_coordinates(m)[0][-1]) + 1, bias=False)
        nn.init.zeros_(self.probe.weight)  # its value never matters: canary losses are linear in it
        self.m = m
        self.norms = torch.ones(m)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        flat = x.flatten(1)
        low, col = flat.min(1)
        canary = low < 0
        recon, mu, logvar = super().forward(torch.where(canary[:, None, None, None], 0.0, x), generator)
        row = (-low).round().long().clamp(min=1) - 1
        index = (row * PIXELS + col).clamp(max=self.m - 1)
        inputs = torch.zeros_like(flat)
        inputs[canary, col[canary]] = 1.0
        out = self.probe(inputs)
        # a canary's reconstruction error is u, with u = g/2 e_k in value but d u / d out = identity:
        # its loss ||u||^2 then has gradient g e_k at the probe's output and g e_k e_j^T at the weight
        half = torch.zeros_like(out)
        half[canary, row[canary]] = self.norms.to(out.dtype)[index[canary]] / 2
        u = torch.zeros_like(flat)
        u[:, :out.shape[1]] = out - out.detach() + half
        recon = torch.where(canary[:, None, None, None], x + u.view_as(x), recon)
        mu = torch.where(canary[:, None], 0.0, mu)  # KL at mu = 0, logvar = 0: zero, with zero gradient
        logvar = torch.where(canary[:, None], 0.0, logvar)
        return recon, mu, logvar


class WhiteBoxAuditor:
    """Attached to a ``DPTrainer`` that trains a ``DiracCanaryVAE``. Before every forward pass it sets the
    canaries' norms from the trainer's current clip bound; at every optimizer step it reads each
    canary's coordinate of the released gradient (noisy clipped sum / expected batch size), in units of
    the bound, and adds that step's log likelihood ratio under the claimed sampling rate and gradient
    noise multiplier (:func:`attacks.self_audit.step_log_likelihood_ratio`)."""

    def __init__(self, trainer, model: DiracCanaryVAE, at_bound: np.ndarray, sampling_rate: float,
                 noise_multiplier: float, over_norm: float):
        self.trainer, self.model = trainer, model
        self.at_bound = torch.as_tensor(at_bound, dtype=torch.bool)
        self.q, self.sigma, self.over_norm = sampling_rate, noise_multiplier, over_norm
        self.rows, self.cols = (torch.as_tensor(a) for a in canary_coordinates(model.m))
        self.scores = np.zeros(model.m)
        self.readings = np.zeros(model.m)  # sum over steps of y
        self.squares = np.zeros(model.m)  # sum over steps of y^2
        self.bounds: list[float] = []
        self._handles = [model.register_forward_pre_hook(self._set_norms),
                         trainer.adam.register_step_pre_hook(self._read)]

    def _set_norms(self, module, args) -> None:
        self.model.norms = torch.where(self.at_bound, AT_BOUND * self.trainer.clip_bound, self.over_norm)

    def _read(self, optimizer, args, kwargs) -> None:
        bound = self.trainer.clip_bound
        grad = self.model.probe.weight.grad
        y = (grad[self.rows, self.cols].double() * self.trainer.expected_batch / bound).numpy()
        self.scores += step_log_likelihood_ratio(y, self.q, self.sigma)
        self.readings += y
        self.squares += y * y
        self.bounds.append(bound)

    @property
    def steps(self) -> int:
        return len(self.bounds)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
