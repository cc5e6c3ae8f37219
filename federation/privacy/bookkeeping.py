"""Book-keeping ghost clipping (Bu et al. 2023) for modules whose parameters all sit in ``nn.Linear``
layers applied to 2-D (batch x features) inputs.

One backward pass of the *summed* per-sample losses, taken with respect to the Linear outputs only,
gives each layer's per-sample output gradients G_l (B x out); forward hooks keep each layer's input
A_l (B x in). For a Linear layer on a 2-D input the per-sample weight gradient is the outer product
G_l[i]^T A_l[i], so

    ||g_i||^2 = sum_l ||A_l[i]||^2 ||G_l[i]||^2 + ||G_l[i]||^2 (bias),

and with c_i = min(1, C / (||g_i|| + 1e-6)) the clipped sums are read off the same book-kept tensors:

    sum_i c_i grad W_l,i = (c * G_l)^T A_l,    sum_i c_i grad b_l,i = c^T G_l.

No second backward pass and nothing of size batch x parameters.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from federation.errors import ConfigError


def bk_ineligibility(module: nn.Module, prefix: str = "") -> str | None:
    """Why book-keeping clipping cannot privatize ``module`` (None when it can): every submodule that
    holds trainable parameters must be a plain ``nn.Linear`` (no parametrizations such as
    spectral_norm)."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and parametrize.is_parametrized(sub):
            return f"{prefix + name or type(module).__name__} is a parametrized Linear (e.g. spectral_norm)"
        if any(p.requires_grad for p in sub.parameters(recurse=False)) and type(sub) is not nn.Linear:
            return f"{prefix + name or type(module).__name__} is a {type(sub).__name__}"
    return None


def resolve_grad_sample_mode(spec, target: nn.Module) -> str:
    """The gradient mode a trainer runs, for a ``PrivacySpec`` and the module it privatizes: ``auto``
    becomes ``bk`` when the module is eligible and ``ghost`` otherwise; an explicit ``bk`` on an
    ineligible module is a ConfigError."""
    mode = spec.grad_sample_mode
    if mode not in ("auto", "bk"):
        return mode
    reason = bk_ineligibility(target, "decoder." if spec.scope == "decoder" else "")
    if reason is None:
        return "bk"
    if mode == "bk":
        raise ConfigError(f"privacy.grad_sample_mode bk needs every trainable layer of the privatized module "
                          f"(scope {spec.scope}) to be a plain nn.Linear, but {reason}; use auto, ghost or hooks")
    return "ghost"


class LinearBookkeeper:
    """Records (input, output) of every Linear of a module during a forward pass, then clips."""

    def __init__(self, module: nn.Module):
        reason = bk_ineligibility(module)
        if reason is not None:
            raise ValueError(f"book-keeping clipping needs plain nn.Linear layers only: {reason}")
        self.layers = [m for m in module.modules() if isinstance(m, nn.Linear)
                       and any(p.requires_grad for p in m.parameters())]
        self._records: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor]] = {}

    def _hook(self, layer: nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        a = inputs[0]
        if a.dim() != 2:
            raise RuntimeError(f"book-keeping clipping needs 2-D inputs to every Linear layer, got shape "
                               f"{tuple(a.shape)}: use grad_sample_mode ghost")
        if layer in self._records:
            raise RuntimeError("book-keeping clipping needs each Linear layer to be called once per forward "
                               "pass: use grad_sample_mode ghost")
        self._records[layer] = (a.detach(), output)

    @contextmanager
    def recording(self):
        """Record the Linear layers' inputs and outputs for the forward passes inside the block; the
        hooks are removed (and the records dropped) on leaving it."""
        handles = [layer.register_forward_hook(self._hook) for layer in self.layers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._records.clear()

    def backprops(self, losses: torch.Tensor) -> list[tuple[nn.Linear, torch.Tensor | None, torch.Tensor | None]]:
        """(layer, A_l, G_l) per Linear layer, G_l = d(sum_i loss_i)/d(out_l): row i is sample i's
        gradient with respect to the layer's output. One backward pass that stops at the recorded
        outputs (no weight gradients, no gradient for the module input). A layer that was not called,
        or whose output does not reach the loss, gets (None, None). Records narrower than float32 (a
        bfloat16 forward) are widened here, once, for the norms and the clipped sums alike."""
        used = [layer for layer in self.layers if layer in self._records]
        grads = torch.autograd.grad(losses.sum(), [self._records[layer][1] for layer in used], allow_unused=True)
        got = {layer: (_widened(self._records[layer][0]), None if g is None else _widened(g))
               for layer, g in zip(used, grads)}
        return [(layer, *got.get(layer, (None, None))) for layer in self.layers]

    @staticmethod
    def per_sample_norms(backprops, batch_size: int) -> torch.Tensor:
        """||g_i|| over all recorded layers' weights and biases. The squares are summed in the
        layers' dtype, at least float32 (a bfloat16 forward's records are widened first); should that
        overflow (norms beyond ~1e19 in float32), again in float64."""
        norms = LinearBookkeeper._norms(backprops, batch_size, None)
        if not bool(torch.isfinite(norms).all()):
            norms = LinearBookkeeper._norms(backprops, batch_size, torch.float64).to(norms.dtype)
        return norms

    @staticmethod
    def _norms(backprops, batch_size: int, dtype: torch.dtype | None) -> torch.Tensor:
        sq = None
        for layer, a, g in backprops:
            if g is None:
                continue
            a, g = (_widened(a), _widened(g)) if dtype is None else (a.to(dtype), g.to(dtype))
            g_sq = g.pow(2).sum(1)
            term = None
            if layer.weight.requires_grad:
                term = a.pow(2).sum(1) * g_sq
            if layer.bias is not None and layer.bias.requires_grad:
                term = g_sq if term is None else term + g_sq
            if term is not None:
                sq = term if sq is None else sq + term
        if sq is None:
            return torch.zeros(batch_size, dtype=dtype or torch.get_default_dtype())
        return sq.sqrt()

    @staticmethod
    def per_sample_dots(backprops, direction: dict[nn.Parameter, torch.Tensor], batch_size: int) -> torch.Tensor:
        """<g_i, v> for every sample, v given per parameter: sum_l (G_l[i] V_l) . A_l[i] + G_l[i] . v_bias."""
        out = torch.zeros(batch_size, dtype=torch.float64)
        for layer, a, g in backprops:
            if g is None:
                continue
            if layer.weight in direction:
                out += (g.mm(direction[layer.weight].to(g.dtype)) * a).sum(1).double()
            if layer.bias is not None and layer.bias in direction:
                out += g.mv(direction[layer.bias].to(g.dtype)).double()
        return out

    @staticmethod
    def clipped_sums(backprops, coeff: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        """{parameter: sum_i coeff_i * per-sample gradient}, for every trainable parameter of the layers, in
        the layers' dtype, at least float32 (from the same widened records the norms were computed from)."""
        out: dict[nn.Parameter, torch.Tensor] = {}
        for layer, a, g in backprops:
            params = [p for p in (layer.weight, layer.bias) if p is not None and p.requires_grad]
            if g is None:
                out.update({p: torch.zeros_like(p) for p in params})
                continue
            a, g = _widened(a), _widened(g)
            cg = g * coeff.to(g.dtype).unsqueeze(1)
            if layer.weight.requires_grad:
                out[layer.weight] = cg.t().mm(a)
            if layer.bias is not None and layer.bias.requires_grad:
                out[layer.bias] = cg.sum(0)
        return out


def _widened(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is narrower (a bfloat16 record of an autocast forward); else unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
