"""Train on synthetic, test on real: a classifier trained on the server's synthetic data labelled
with the client id, tested on real test images labelled with the client that holds their class."""
from __future__ import annotations

import numpy as np
import torch

from federation.metrics.domain_cnn import fit_classifier, predict


def class_owner(class_counts: list[dict[int, int]]) -> dict[int, int]:
    """Each class goes to the client holding most of it (class-disjoint: its only holder)."""
    owner: dict[int, int] = {}
    for c in range(10):
        counts = [cc.get(c, 0) for cc in class_counts]
        if max(counts) > 0:
            owner[c] = int(np.argmax(counts))
    return owner


def tstr_accuracy(synthetic_x: torch.Tensor, synthetic_y: torch.Tensor, test_x: torch.Tensor,
                  test_labels: np.ndarray, owner: dict[int, int], epochs: int, seed: int) -> float:
    n_clients = int(synthetic_y.max()) + 1
    keep = np.array([int(c) in owner for c in test_labels])
    target = torch.tensor([owner[int(c)] for c in test_labels[keep]])
    net = fit_classifier(synthetic_x, synthetic_y, n_clients, epochs, seed, channels_last=True)
    return float((predict(net, test_x[torch.from_numpy(keep)]) == target).float().mean())
