"""An empirical Lipschitz bracket for a shared decoder D: R^d -> R^784 (flattened output, L2 norms).

- **lower**: the largest Jacobian spectral norm ||J_D(z)||_2 actually evaluated at a concrete z. Each
  value is ||J v|| for a unit vector v found by batched power iteration (jvp / vjp, never a full
  per-point Jacobian), so it never exceeds ||J_D(z)||_2, hence never exceeds the global Lipschitz
  constant, whether or not the iteration converged. Probe points: samples from the N(0, I) prior,
  latents the caller supplies (e.g. of candidate records), and a few Adam steps of gradient ascent on
  ||J_D(z)||_2 started from the best of those.
- **upper**: the product over layers of each linear layer's exact operator norm (bias excluded) and
  each activation's Lipschitz constant. A layer with no known constant is an error, never a guess.
- **reference_grad_sum_max**: max over prior samples of ||grad_z sum(D(z))||_2, the figure the
  reference code (and the LCD penalty) uses. It is neither bound: the gradient of the summed
  output is J^T 1, whose norm ranges from 0 up to sqrt(784) ||J||_2.

The decoder is evaluated in eval mode with parameter gradients off (modes and flags are restored
afterwards), so a spectral-norm parametrization uses its stored singular vectors and is not advanced.
The lower-bound code relies on the decoder treating batch rows independently (true of every layer the
upper bound accepts): the Jacobian of the batched map is then block-diagonal, one block per point.
"""
from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

with warnings.catch_warnings():
    # torch.func.jvp registers torch's forward-mode decompositions with torch.jit.script on first use,
    # which warns that torch.jit.script is deprecated: load them here, quietly, so that an audit's
    # output carries only its own messages.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    # torch loads them only under the same condition (PYTORCH_JIT=0 turns scripting off, and then the
    # import itself fails)
    if os.environ.get("PYTORCH_JIT", "1") == "1" and __debug__:
        try:
            import torch._decomp.decompositions_for_jvp  # noqa: F401
        except ImportError:  # a torch without it has nothing to register
            pass

# Lipschitz constants of the elementwise / reshaping layers the upper bound accepts.
_ACTIVATION_LIPSCHITZ = {
    nn.ReLU: lambda m: 1.0,
    nn.Sigmoid: lambda m: 0.25,
    nn.Tanh: lambda m: 1.0,
    nn.LeakyReLU: lambda m: max(1.0, abs(float(m.negative_slope))),
    nn.Flatten: lambda m: 1.0,
    nn.Unflatten: lambda m: 1.0,
    nn.Identity: lambda m: 1.0,
}
_LINEAR_LAYERS = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
SOURCES = ("prior", "candidates", "ascent")


class UnsupportedLayerError(TypeError):
    """The upper bound met a layer whose Lipschitz constant it does not know."""


@contextmanager
def frozen(decoder: nn.Module):
    """Eval mode and ``requires_grad=False`` on every parameter for the duration; restored after."""
    modes = [(m, m.training) for m in decoder.modules()]
    flags = [(p, p.requires_grad) for p in decoder.parameters()]
    decoder.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield decoder
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def _dtype(decoder: nn.Module) -> torch.dtype:
    return next(decoder.parameters()).dtype


def _flat(decoder: nn.Module):
    return lambda z: decoder(z).flatten(1)


# ---------------------------------------------------------------- lower bound
def jacobian_spectral_norms(decoder: nn.Module, latents: torch.Tensor, *, init: torch.Tensor | None = None,
                            generator: torch.Generator | None = None, tol: float = 1e-6,
                            max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """||J_D(z)||_2 at every row z of ``latents`` (B, d) by power iteration on J^T J, batched over rows.

    Returns (norms (B,), unit vectors V (B, d)) with norms[i] = ||J(z_i) V[i]|| exactly as evaluated,
    so each norm is a lower estimate of ||J(z_i)||_2 even if its iteration stopped at ``max_iter``.
    A row stops iterating once its estimate changes by at most ``tol`` (relative) between iterations.
    ``init`` warm-starts V; otherwise V starts from N(0, I) drawn from ``generator``."""
    with frozen(decoder):
        z = latents.detach().to(_dtype(decoder))
        f = _flat(decoder)
        tiny = torch.finfo(z.dtype).tiny
        v = init.detach().to(z.dtype).clone() if init is not None else torch.randn(
            z.shape, generator=generator, dtype=z.dtype)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(tiny)
        norms = torch.zeros(len(z), dtype=z.dtype)
        previous = torch.full((len(z),), float("nan"), dtype=z.dtype)
        active = torch.arange(len(z))
        for iteration in range(max(1, max_iter)):
            z_a, v_a = z[active], v[active]
            jv = torch.func.jvp(f, (z_a,), (v_a,))[1]
            norms_a = jv.norm(dim=1)
            norms[active] = norms_a
            done = (norms_a - previous[active]).abs() <= tol * norms_a  # False while previous is NaN
            previous[active] = norms_a
            if bool(done.all()) or iteration == max_iter - 1:
                break  # every row's norm belongs to its current v
            keep = ~done
            w = torch.func.vjp(f, z_a[keep])[1](jv[keep])[0]  # J^T J v on the rows still iterating
            w_norm = w.norm(dim=1, keepdim=True)
            v[active[keep]] = torch.where(w_norm > 0, w / w_norm.clamp_min(tiny), v_a[keep])
            active = active[keep]
        return norms, v


def _ascend(decoder: nn.Module, starts: torch.Tensor, directions: torch.Tensor, *, steps: int, lr: float,
            tol: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam ascent on z of ||J(z) v|| (v the current top right singular vector, re-converged after each
    step). Returns every evaluated point and its Jacobian norm: (steps * B, d), (steps * B,)."""
    f = _flat(decoder)

    def objective(z, v):  # rows are independent, so d/dz_i of the sum is d/dz_i of row i's norm
        return torch.func.jvp(f, (z,), (v,))[1].norm(dim=1).sum()

    z = starts.detach().clone()
    v = directions
    optimizer = torch.optim.Adam([z], lr=lr, maximize=True)
    points, norms = [], []
    with frozen(decoder):
        for _ in range(steps):
            z.grad = torch.nan_to_num(torch.func.grad(objective)(z.detach(), v))
            optimizer.step()
            step_norms, v = jacobian_spectral_norms(decoder, z, init=v, tol=tol, max_iter=max_iter)
            points.append(z.detach().clone())
            norms.append(step_norms)
    return torch.cat(points), torch.cat(norms)


def _as_latents(candidate_latents, latent_dim: int, dtype: torch.dtype) -> torch.Tensor:
    if candidate_latents is None:
        return torch.zeros((0, latent_dim), dtype=dtype)
    z = torch.as_tensor(candidate_latents).detach().to(dtype)
    if z.ndim != 2 or z.shape[1] != latent_dim:
        raise ValueError(f"candidate_latents must have shape (n, {latent_dim}), got {tuple(z.shape)}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("candidate_latents contain non-finite values")
    return z


def lipschitz_lower_bound(decoder: nn.Module, latent_dim: int, *, candidate_latents=None, n_prior: int = 512,
                          ascent_starts: int = 8, ascent_steps: int = 20, ascent_lr: float = 0.01,
                          tol: float = 1e-6, max_iter: int = 200,
                          generator: torch.Generator | None = None) -> dict:
    """The largest evaluated ||J_D(z)||_2 over prior samples, caller-supplied latents and ascent points.

    Returns {"lower", "lower_source", "lower_z_norm", "lower_by_source", "n_probe_points"};
    ``lower_by_source`` maps each source to its best norm (None when the source evaluated nothing)."""
    dtype = _dtype(decoder)
    prior = torch.randn((n_prior, latent_dim), generator=generator, dtype=dtype)
    candidates = _as_latents(candidate_latents, latent_dim, dtype)
    probes = torch.cat([prior, candidates])
    if len(probes) == 0:
        raise ValueError("no probe points: n_prior is 0 and no candidate_latents were given")
    norms, directions = jacobian_spectral_norms(decoder, probes, generator=generator, tol=tol, max_iter=max_iter)
    sources = {"prior": (prior, norms[:n_prior]), "candidates": (candidates, norms[n_prior:])}

    best = torch.argsort(norms, descending=True, stable=True)[:max(0, ascent_starts)]
    if ascent_steps > 0 and len(best) > 0:
        sources["ascent"] = _ascend(decoder, probes[best], directions[best], steps=ascent_steps, lr=ascent_lr,
                                    tol=tol, max_iter=max_iter)
    else:
        sources["ascent"] = (probes.new_zeros((0, latent_dim)), probes.new_zeros(0))

    by_source, winner = {}, None
    for name in SOURCES:
        points, values = sources[name]
        if len(values) == 0:
            by_source[name] = None
            continue
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"non-finite Jacobian norm among the {name} probe points")
        i = int(torch.argmax(values))
        by_source[name] = float(values[i])
        if winner is None or by_source[name] > winner[1]:
            winner = (name, by_source[name], float(points[i].norm()))
    return {"lower": winner[1], "lower_source": winner[0], "lower_z_norm": winner[2],
            "lower_by_source": by_source, "n_probe_points": sum(len(v) for _, v in sources.values())}


# ---------------------------------------------------------------- upper bound
def _layers(decoder: nn.Module) -> list[nn.Module]:
    """The decoder's layers in order; nested nn.Sequential containers are flattened."""
    if not isinstance(decoder, nn.Sequential):
        raise UnsupportedLayerError(
            f"the upper bound needs an nn.Sequential decoder, got {type(decoder).__name__}")
    layers = []
    for child in decoder:
        layers += _layers(child) if isinstance(child, nn.Sequential) else [child]
    return layers


def _largest_singular_value(matrix: torch.Tensor) -> float:
    """Exact (to float64 rounding) largest singular value: sqrt of the top eigenvalue of the smaller
    Gram matrix, which is much cheaper than a full SVD of a tall 6272 x 3136 matrix."""
    m = matrix.to(torch.float64)
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    return math.sqrt(max(float(torch.linalg.eigvalsh(gram)[-1]), 0.0))


def _conv_map(module: nn.Module, input_shape: tuple[int, ...]):
    """The bias-free linear map of a Conv2d / ConvTranspose2d on one flattened input, in float64."""
    if module.padding_mode != "zeros":
        raise UnsupportedLayerError(f"{type(module).__name__} with padding_mode={module.padding_mode!r}")
    weight = module.weight.detach().to(torch.float64)  # the effective weight (parametrizations applied)
    if isinstance(module, nn.ConvTranspose2d):
        def apply(x):
            return F.conv_transpose2d(x.reshape(1, *input_shape), weight, None, module.stride, module.padding,
                                      module.output_padding, module.groups, module.dilation).reshape(-1)
    else:
        def apply(x):
            return F.conv2d(x.reshape(1, *input_shape), weight, None, module.stride, module.padding,
                            module.dilation, module.groups).reshape(-1)
    return apply


def operator_norm(module: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Exact operator norm (bias excluded) of a Linear, Conv2d or ConvTranspose2d layer acting on one
    input of ``input_shape`` (no batch dimension). Convolutions are materialized as matrices."""
    if isinstance(module, nn.Linear):
        return float(torch.linalg.matrix_norm(module.weight.detach().to(torch.float64), ord=2))
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        apply = _conv_map(module, tuple(input_shape))
        n_in = math.prod(input_shape)
        x0 = torch.zeros(n_in, dtype=torch.float64)
        n_out = apply(x0).numel()
        jacobian = torch.func.jacfwd if n_in <= n_out else torch.func.jacrev  # fewer basis vectors
        return _largest_singular_value(jacobian(apply)(x0))
    raise UnsupportedLayerError(f"operator_norm does not know {type(module).__name__}")


def layer_lipschitz_factors(decoder: nn.Module, latent_dim: int) -> list[dict]:
    """One entry per layer: {"index", "type", "kind" ("linear" | "activation"), "input_shape", "lipschitz"}.
    Input shapes come from a traced forward pass of a zero latent."""
    factors = []
    with frozen(decoder), torch.no_grad():
        x = torch.zeros((1, latent_dim), dtype=_dtype(decoder))
        for index, layer in enumerate(_layers(decoder)):
            shape = list(x.shape[1:])
            if isinstance(layer, _LINEAR_LAYERS):
                kind, value = "linear", operator_norm(layer, tuple(shape))
            else:
                constant = next((c for t, c in _ACTIVATION_LIPSCHITZ.items() if type(layer) is t), None)
                if constant is None:
                    raise UnsupportedLayerError(
                        f"layer {index} ({type(layer).__name__}) has no known Lipschitz constant; "
                        f"refusing to report an upper bound that might not hold")
                kind, value = "activation", constant(layer)
            factors.append({"index": index, "type": type(layer).__name__, "kind": kind,
                            "input_shape": shape, "lipschitz": value})
            x = layer(x)
    return factors


def lipschitz_upper_bound(decoder: nn.Module, latent_dim: int) -> dict:
    """{"upper": product of every layer's factor, "layer_norms": layer_lipschitz_factors(...)}."""
    factors = layer_lipschitz_factors(decoder, latent_dim)
    return {"upper": math.prod(f["lipschitz"] for f in factors), "layer_norms": factors}


# ---------------------------------------------------------------- the reference code's figure
def reference_grad_sum_max(decoder: nn.Module, latents: torch.Tensor) -> float:
    """max over rows z of ||grad_z sum(D(z))||_2, the quantity the reference code reports (not a bound)."""
    with frozen(decoder):
        z = latents.detach().to(_dtype(decoder))
        grads = torch.func.grad(lambda x: decoder(x).sum())(z)  # rows are independent: row i is grad at z_i
        return float(grads.norm(dim=1).max())


# ---------------------------------------------------------------- the bracket
def lipschitz_bracket(decoder: nn.Module, latent_dim: int, *, candidate_latents=None, n_prior: int = 512,
                      ascent_starts: int = 8, ascent_steps: int = 20, ascent_lr: float = 0.01,
                      tol: float = 1e-6, max_iter: int = 200, seed: int = 0) -> dict:
    """lower <= Lip(D) <= upper, plus the reference code's gradient-of-sum figure; deterministic in ``seed``.

    Keys: lower, upper, lower_source, lower_z_norm, lower_by_source, reference_grad_sum_max,
    layer_norms, n_probe_points, latent_dim, seed, settings. All values are JSON-serializable."""
    generator = torch.Generator().manual_seed(seed)
    lower = lipschitz_lower_bound(decoder, latent_dim, candidate_latents=candidate_latents, n_prior=n_prior,
                                  ascent_starts=ascent_starts, ascent_steps=ascent_steps, ascent_lr=ascent_lr,
                                  tol=tol, max_iter=max_iter, generator=generator)
    upper = lipschitz_upper_bound(decoder, latent_dim)
    # the same prior samples as the lower bound's (same seed, drawn first)
    prior = torch.randn((n_prior, latent_dim), generator=torch.Generator().manual_seed(seed), dtype=_dtype(decoder))
    return {
        "lower": lower["lower"],
        "upper": upper["upper"],
        "lower_source": lower["lower_source"],
        "lower_z_norm": lower["lower_z_norm"],
        "lower_by_source": lower["lower_by_source"],
        "reference_grad_sum_max": reference_grad_sum_max(decoder, prior) if n_prior > 0 else None,
        "layer_norms": upper["layer_norms"],
        "n_probe_points": lower["n_probe_points"],
        "latent_dim": latent_dim,
        "seed": seed,
        "settings": {"n_prior": n_prior, "ascent_starts": ascent_starts, "ascent_steps": ascent_steps,
                     "ascent_lr": ascent_lr, "tol": tol, "max_iter": max_iter},
    }
