"""All utility metrics of a trained federation, computed the same way for every strategy."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from federation.errors import FederationError
from federation.rng import seeded_generator
from federation.metrics.domain_cnn import SmallCNN, features, predict
from federation.metrics.fid import frechet_distance
from federation.metrics.figures import latent_scatter, sample_grid
from federation.metrics.probe import linear_probe
from federation.metrics.tstr import tstr_accuracy
from federation.training import decode, encode_mu


def probe(vae, test_x: torch.Tensor, test_labels: np.ndarray, seed: int, max_iter: int) -> dict:
    mu = encode_mu(vae, test_x)
    if not bool(torch.isfinite(mu).all()):
        raise FederationError("the global model's encoder gives non-finite outputs: training diverged "
                              "(a lower training.lr may help)")
    return linear_probe(mu.numpy(), test_labels, seed, max_iter)


def prior_samples(vae, n: int, seed: int) -> torch.Tensor:
    z = torch.randn(n, vae.latent_dim, generator=seeded_generator(seed, 9))
    return decode(vae.decoder, z)


def evaluate(strategy, test_x: torch.Tensor, test_labels: np.ndarray, cnn: SmallCNN, owner: dict[int, int],
             seed: int, fid_samples: int, tstr_epochs: int, probe_max_iter: int,
             figures_dir: Path | None) -> tuple[dict, dict]:
    """Returns (utility metrics, notes explaining any metric that does not apply)."""
    vae = strategy.global_vae
    out = probe(vae, test_x, test_labels, seed, probe_max_iter)
    generated = prior_samples(vae, fid_samples, seed)
    out["fid"] = frechet_distance(features(cnn, test_x).numpy(), features(cnn, generated).numpy())
    out["fid_kind"] = "domain-CNN FID"
    out["domain_cnn_test_accuracy"] = float((predict(cnn, test_x).numpy() == test_labels).mean())
    notes = {}
    synthetic = strategy.synthetic_set()
    if synthetic is None:
        out["tstr_accuracy"] = None
        notes["tstr_accuracy"] = "not applicable: this strategy has no per-client synthetic data"
    else:
        out["tstr_accuracy"] = tstr_accuracy(*synthetic, test_x, test_labels, owner, tstr_epochs, seed)
    if figures_dir is not None:
        sample_grid(generated, figures_dir / "samples-global.png")
        for cid, decoder in sorted(strategy.client_decoders().items()):
            z = torch.randn(64, _latent_dim(decoder), generator=seeded_generator(seed, 10, cid))
            sample_grid(decode(decoder, z), figures_dir / f"samples-client-{cid}.png")
        latent_scatter(encode_mu(vae, test_x).numpy(), test_labels, figures_dir / "latent-scatter.png",
                       f"global encoder mu on the real test set ({strategy.name})")
    return out, notes


def _latent_dim(decoder: torch.nn.Module) -> int:
    first = next(m for m in decoder.modules() if isinstance(m, torch.nn.Linear))
    return first.in_features
