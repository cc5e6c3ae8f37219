"""attacks.lipschitz: the lower bound is an evaluated Jacobian norm, the upper bound a product of exact
layer norms, and lower <= upper on every decoder shape the project builds."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attacks.lipschitz import (UnsupportedLayerError, jacobian_spectral_norms, lipschitz_bracket,
                               lipschitz_upper_bound, operator_norm)
from federation.models import build_decoder

CHEAP = {"n_prior": 32, "ascent_starts": 4, "ascent_steps": 5}
SLACK = 1e-5  # the lower bound is computed in float32, the upper bound in float64


def _fill(module: nn.Module, generator: torch.Generator, scale: float = 1.0) -> nn.Module:
    """Overwrite every parameter with N(0, scale^2 / fan_in) draws from ``generator``."""
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p.shape[1] if p.ndim > 1 else p.shape[0]
            p.copy_(torch.randn(p.shape, generator=generator) * scale / math.sqrt(fan_in))
    return module


def _exact_jacobian_norm(decoder: nn.Module, z: torch.Tensor) -> float:
    with torch.no_grad():
        jacobian = torch.func.jacfwd(lambda x: decoder(x[None]).flatten())(z)
    return float(torch.linalg.svdvals(jacobian.double())[0])


# ---------------------------------------------------------------- exact cases
@pytest.mark.parametrize("latent_dim", [1, 3])
def test_linear_decoder_bounds_equal_the_weight_spectral_norm(latent_dim):
    decoder = nn.Sequential(nn.Linear(latent_dim, 784), nn.Unflatten(1, (1, 28, 28)))
    _fill(decoder, torch.Generator().manual_seed(latent_dim))
    sigma = float(torch.linalg.svdvals(decoder[0].weight.detach().double())[0])
    # near-equal top singular values make power iteration slow: iterate to float32 resolution
    result = lipschitz_bracket(decoder, latent_dim, tol=1e-9, max_iter=2000, **CHEAP)
    assert result["upper"] == pytest.approx(sigma, rel=1e-9)
    assert result["lower"] == pytest.approx(sigma, rel=1e-5)
    assert result["lower"] <= result["upper"] * (1 + SLACK)


def test_power_iteration_matches_the_exact_jacobian_norm():
    g = torch.Generator().manual_seed(3)
    mlp = _fill(nn.Sequential(nn.Linear(4, 40), nn.Tanh(), nn.Linear(40, 30), nn.LeakyReLU(0.3),
                              nn.Linear(30, 784), nn.Sigmoid()), g, scale=2.0)
    conv = _fill(build_decoder({"arch": "conv", "latent_dim": 3, "channels": [4, 8], "fc": 16}), g, scale=2.0)
    for decoder, latent_dim in ((mlp, 4), (conv, 3)):
        z = torch.randn((6, latent_dim), generator=g)
        norms, vectors = jacobian_spectral_norms(decoder, z, generator=g, tol=1e-7, max_iter=2000)
        assert torch.allclose(vectors.norm(dim=1), torch.ones(len(z)), atol=1e-5)
        for i in range(len(z)):
            exact = _exact_jacobian_norm(decoder, z[i])
            assert float(norms[i]) <= exact * (1 + SLACK)  # ||J v|| with unit v never exceeds ||J||
            assert float(norms[i]) == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.ConvTranspose2d(3, 2, 4, 2, 1), (3, 5, 5)),
    (lambda: nn.ConvTranspose2d(2, 3, 3, 2, 1, output_padding=1), (2, 4, 4)),
    (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 6, 6)),
])
def test_conv_operator_norm_is_exact(make, shape):
    torch.manual_seed(0)
    layer = make()
    n = math.prod(shape)
    with torch.no_grad():  # the matrix by another route: the affine layer on the identity basis, minus its bias
        double = make().double()
        double.load_state_dict(layer.state_dict())
        basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
        matrix = (double(basis) - double(torch.zeros((1, *shape), dtype=torch.float64))).reshape(n, -1).T
    assert operator_norm(layer, shape) == pytest.approx(float(torch.linalg.svdvals(matrix)[0]), rel=1e-10)


def test_effective_spectral_norm_weight_is_used():
    torch.manual_seed(1)
    layer = nn.utils.parametrizations.spectral_norm(nn.ConvTranspose2d(3, 2, 4, 2, 1))
    normalized, unnormalized = nn.ConvTranspose2d(3, 2, 4, 2, 1), nn.ConvTranspose2d(3, 2, 4, 2, 1)
    with torch.no_grad():
        normalized.weight.copy_(layer.eval().weight)  # W / sigma, frozen into a plain layer
        unnormalized.weight.copy_(layer.parametrizations.weight.original)
    assert operator_norm(layer, (3, 5, 5)) == pytest.approx(operator_norm(normalized, (3, 5, 5)), rel=1e-12)
    assert operator_norm(layer, (3, 5, 5)) != pytest.approx(operator_norm(unnormalized, (3, 5, 5)), rel=1e-3)


# ---------------------------------------------------------------- lower <= upper
@st.composite
def small_mlp_decoders(draw):
    latent_dim = draw(st.integers(1, 4))
    widths = draw(st.lists(st.integers(1, 12), min_size=0, max_size=3))
    activations = draw(st.lists(st.sampled_from(["relu", "sigmoid", "tanh", "leaky"]),
                                min_size=len(widths) + 1, max_size=len(widths) + 1))
    slopes = draw(st.lists(st.floats(0.0, 2.0), min_size=len(widths) + 1, max_size=len(widths) + 1))
    scale = draw(st.floats(0.1, 4.0))
    seed = draw(st.integers(0, 2**31 - 1))
    make = {"relu": lambda s: nn.ReLU(), "sigmoid": lambda s: nn.Sigmoid(), "tanh": lambda s: nn.Tanh(),
            "leaky": lambda s: nn.LeakyReLU(s)}
    layers, width = [], latent_dim
    for w, act, slope in zip(widths + [784], activations, slopes):
        layers += [nn.Linear(width, w), make[act](slope)]
        width = w
    layers.append(nn.Unflatten(1, (1, 28, 28)))
    return _fill(nn.Sequential(*layers), torch.Generator().manual_seed(seed), scale), latent_dim


@settings(max_examples=30, deadline=None)
@given(small_mlp_decoders())
def test_lower_never_exceeds_upper_on_random_mlps(decoder_and_dim):
    decoder, latent_dim = decoder_and_dim
    result = lipschitz_bracket(decoder, latent_dim, **CHEAP)
    assert 0.0 <= result["lower"] <= result["upper"] * (1 + SLACK)


@pytest.mark.parametrize("spec", [
    {"arch": "mlp", "latent_dim": 2, "hidden": [64, 32]},
    {"arch": "conv", "latent_dim": 2, "channels": [4, 8], "fc": 16},
    {"arch": "mlp", "latent_dim": 2, "hidden": [64, 32], "spectral_norm": True},
    {"arch": "conv", "latent_dim": 2, "channels": [4, 8], "fc": 16, "spectral_norm": True},
])
def test_lower_never_exceeds_upper_on_project_decoders(spec):
    torch.manual_seed(0)
    decoder = build_decoder(spec, torch.Generator().manual_seed(0))
    candidates = torch.randn(5, 2) * 3
    result = lipschitz_bracket(decoder, 2, candidate_latents=candidates, **CHEAP)
    assert 0.0 < result["lower"] <= result["upper"] * (1 + SLACK)
    assert result["lower_source"] in ("prior", "candidates", "ascent")
    assert result["lower"] == result["lower_by_source"][result["lower_source"]]
    assert result["n_probe_points"] == 32 + 5 + 4 * 5
    assert result["upper"] == pytest.approx(math.prod(f["lipschitz"] for f in result["layer_norms"]))
    assert json.loads(json.dumps(result)) == result


# ---------------------------------------------------------------- probe sources
def test_candidate_latents_can_carry_the_lower_bound():
    """A decoder whose slope peaks far from the prior: only the candidate sits on the peak."""
    decoder = nn.Sequential(nn.Linear(2, 1), nn.Tanh(), nn.Linear(1, 784))
    with torch.no_grad():
        decoder[0].weight.copy_(torch.tensor([[5.0, 0.0]]))
        decoder[0].bias.fill_(-40.0)  # tanh is steep only around z_1 = 8
        decoder[2].weight.fill_(0.01)
        decoder[2].bias.zero_()
    peak = torch.tensor([[8.0, 0.0]])
    result = lipschitz_bracket(decoder, 2, candidate_latents=peak, n_prior=64, ascent_steps=0)
    assert result["lower_source"] == "candidates"
    assert result["lower_z_norm"] == pytest.approx(8.0)
    assert result["lower"] == pytest.approx(5.0 * 0.01 * 28, rel=1e-5)  # |w1| * ||w2|| * tanh'(0)
    assert result["lower_by_source"]["prior"] < 1e-3 * result["lower"]
    assert result["lower"] <= result["upper"] * (1 + SLACK)


def test_ascent_climbs_towards_the_steepest_point():
    decoder = nn.Sequential(nn.Linear(2, 1), nn.Sigmoid(), nn.Linear(1, 784))
    with torch.no_grad():
        decoder[0].weight.copy_(torch.tensor([[1.0, 0.0]]))
        decoder[0].bias.fill_(-2.5)  # sigmoid is steepest at z_1 = 2.5
        decoder[2].weight.fill_(1.0)
        decoder[2].bias.zero_()
    result = lipschitz_bracket(decoder, 2, n_prior=16, ascent_starts=2, ascent_steps=60, ascent_lr=0.1)
    assert result["lower_source"] == "ascent"
    assert result["lower_by_source"]["ascent"] > result["lower_by_source"]["prior"]
    assert result["lower"] == pytest.approx(0.25 * 28, rel=1e-3)  # the global max, = upper
    assert result["lower"] <= result["upper"] * (1 + SLACK)


# ---------------------------------------------------------------- spectral normalization (LCD-VAE)
def _converge_spectral_norm(decoder: nn.Module, latent_dim: int, forwards: int = 200) -> None:
    decoder.train()
    with torch.no_grad():
        for _ in range(forwards):  # each training-mode forward runs one power iteration per layer
            decoder(torch.zeros(1, latent_dim))
    decoder.eval()


def test_spectral_norm_mlp_upper_bound_is_the_activation_product():
    torch.manual_seed(0)
    decoder = build_decoder({"arch": "mlp", "latent_dim": 2, "hidden": [64, 32], "spectral_norm": True}, torch.Generator().manual_seed(0))
    _converge_spectral_norm(decoder, 2)
    result = lipschitz_bracket(decoder, 2, **CHEAP)
    linear = [f["lipschitz"] for f in result["layer_norms"] if f["kind"] == "linear"]
    assert len(linear) == 3 and all(n == pytest.approx(1.0, rel=0.05) for n in linear)
    assert result["upper"] == pytest.approx(0.25, rel=0.05)  # ReLUs (1) times the output Sigmoid (1/4)
    assert result["lower"] <= result["upper"] * (1 + SLACK)


def test_spectral_norm_conv_linear_layers_are_normalized_but_convs_are_measured():
    """spectral_norm normalizes a ConvTranspose2d's reshaped kernel, not the convolution operator, so
    the conv factors are whatever the exact operator norm is (not necessarily 1)."""
    torch.manual_seed(0)
    decoder = build_decoder({"arch": "conv", "latent_dim": 2, "channels": [4, 8], "fc": 16, "spectral_norm": True}, torch.Generator().manual_seed(0))
    _converge_spectral_norm(decoder, 2)
    factors = lipschitz_upper_bound(decoder, 2)["layer_norms"]
    linear = [f["lipschitz"] for f in factors if f["type"] == "ParametrizedLinear"]
    convs = [f for f in factors if f["type"] == "ParametrizedConvTranspose2d"]
    assert len(linear) == 2 and all(n == pytest.approx(1.0, rel=0.05) for n in linear)
    assert [c["input_shape"] for c in convs] == [[8, 7, 7], [4, 14, 14]]
    assert all(c["lipschitz"] > 0 for c in convs)


def test_bracket_leaves_modes_and_spectral_state_untouched():
    torch.manual_seed(0)
    decoder = build_decoder({"arch": "mlp", "latent_dim": 2, "hidden": [16, 8], "spectral_norm": True}, torch.Generator().manual_seed(0))
    decoder.train()
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    lipschitz_bracket(decoder, 2, **CHEAP)
    assert decoder.training and all(m.training for m in decoder.modules())
    assert all(p.requires_grad for p in decoder.parameters())
    after = decoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------- determinism and errors
def test_same_seed_same_result():
    torch.manual_seed(0)
    decoder = build_decoder({"arch": "mlp", "latent_dim": 2, "hidden": [64, 32]}, torch.Generator().manual_seed(0))
    first = lipschitz_bracket(decoder, 2, seed=7, **CHEAP)
    assert lipschitz_bracket(decoder, 2, seed=7, **CHEAP) == first
    assert lipschitz_bracket(decoder, 2, seed=8, **CHEAP)["lower_by_source"] != first["lower_by_source"]


def test_reference_figure_is_the_summed_output_gradient():
    decoder = nn.Sequential(nn.Linear(3, 784))
    _fill(decoder, torch.Generator().manual_seed(0))
    result = lipschitz_bracket(decoder, 3, **CHEAP)
    expected = float(decoder[0].weight.detach().sum(0).norm())  # grad_z sum(Wz + b) = W^T 1
    assert result["reference_grad_sum_max"] == pytest.approx(expected, rel=1e-5)


def test_unknown_layers_are_refused():
    with pytest.raises(UnsupportedLayerError, match="Softplus"):
        lipschitz_upper_bound(nn.Sequential(nn.Linear(2, 784), nn.Softplus()), 2)
    with pytest.raises(UnsupportedLayerError, match="nn.Sequential"):
        lipschitz_upper_bound(nn.Linear(2, 784), 2)
    with pytest.raises(ValueError, match="candidate_latents"):
        lipschitz_bracket(nn.Sequential(nn.Linear(2, 784)), 2, candidate_latents=torch.zeros(3, 5))
