"""Optional latent GMM (as in the reference code): a client fits a Gaussian mixture to its private
latents and shares it, so the server samples from it instead of the prior. The GMM is an *extra*
shared artifact, derived from private data with no formal guarantee; uploads declare it."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.mixture import GaussianMixture

ARTIFACT = "latent_gmm"


def fit_latent_gmm(latents: torch.Tensor, components: int, seed: int) -> dict[str, torch.Tensor]:
    gmm = GaussianMixture(n_components=min(components, len(latents)), covariance_type="full",
                          random_state=seed, reg_covar=1e-5)
    gmm.fit(latents.numpy().astype(np.float64))
    return {"weights": torch.tensor(gmm.weights_, dtype=torch.float32),
            "means": torch.tensor(gmm.means_, dtype=torch.float32),
            "covariances": torch.tensor(gmm.covariances_, dtype=torch.float32)}


def sample_latent_gmm(gmm: dict[str, torch.Tensor], n: int, generator: torch.Generator) -> torch.Tensor:
    weights = gmm["weights"].double().clamp_min(0)
    comp = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=generator)
    chol = torch.linalg.cholesky(gmm["covariances"].double())
    eps = torch.randn(n, gmm["means"].shape[1], generator=generator, dtype=torch.float64)
    z = gmm["means"].double()[comp] + torch.einsum("nij,nj->ni", chol[comp], eps)
    return z.float()
