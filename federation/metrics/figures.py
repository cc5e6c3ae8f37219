"""PNG figures: sample grids per decoder and a latent scatter of the global encoder."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import save_image  # noqa: E402


def sample_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images[: nrow * nrow].clamp(0, 1), str(path), nrow=nrow, padding=2, pad_value=1.0)
    return path


def latent_scatter(mu: np.ndarray, labels: np.ndarray, path: Path, title: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mu.shape[1] > 2:  # project onto the top two principal directions
        centered = mu - mu.mean(0)
        _, _, vt = np.linalg.svd(centered, full_matrices=False)
        mu = centered @ vt[:2].T
    elif mu.shape[1] == 1:
        mu = np.concatenate([mu, np.zeros_like(mu)], 1)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    sc = ax.scatter(mu[:, 0], mu[:, 1], c=labels, cmap="tab10", s=3, alpha=0.6, vmin=-0.5, vmax=9.5)
    fig.colorbar(sc, ax=ax, ticks=range(10), label="class")
    ax.set_title(title)
    ax.set_xlabel("latent 1")
    ax.set_ylabel("latent 2")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
