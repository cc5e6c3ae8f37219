"""Training numerics shared by every trainer (clients, the server, DP-SGD, reference models).

- ``adam``: Adam with torch's fused CPU kernel, one pass over all parameters per step instead of a
  chain of per-tensor operations. The update is Adam's; only the order of float roundings differs from
  the unfused kernels (about 1e-8 on the paper VAE's weights after 20 steps). Opacus's DP optimizers
  wrap it unchanged: they hand it the clipped, noised gradient and call its ``step``.
- ``training.precision`` (``PRECISIONS``): ``fp32`` (the default), or ``bf16``: the forward pass runs
  under CPU autocast to bfloat16, so the matmuls of forward and backward run in bfloat16, while the
  weights, the optimizer, the loss (and with DP-SGD the per-sample norms, clipped sums and noise) stay
  float32.
"""
from __future__ import annotations

import torch

PRECISIONS = ("fp32", "bf16")


def adam(params, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, fused=True)


def forward_precision(precision: str):
    """The context the forward pass runs in: CPU autocast to bfloat16 for ``bf16``, nothing for ``fp32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
