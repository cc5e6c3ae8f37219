"""A small CNN classifier trained on a dataset's real training images. Its penultimate layer is the
feature extractor of "domain-CNN FID" (not Inception FID); the same network class is the TSTR
classifier. Trained extractors are cached per dataset, data checksum and seed."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from federation.rng import DOMAIN_CNN_INIT, DOMAIN_CNN_TRAIN, init_parameters, seeded_generator


class SmallCNN(nn.Module):
    def __init__(self, n_classes: int = 10, width: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 49, width), nn.ReLU())
        self.head = nn.Linear(width, n_classes)

    def forward(self, x):
        return self.head(self.features(x))


def fit_classifier(x: torch.Tensor, y: torch.Tensor, n_classes: int, epochs: int, seed: int,
                   batch_size: int = 128, lr: float = 1e-3, channels_last: bool = False) -> SmallCNN:
    """``channels_last``: train in torch's channels-last layout (about 1.3x faster convolutions on CPU;
    the same network and draws, only the float summation order differs)."""
    net = init_parameters(SmallCNN(n_classes), seeded_generator(seed, DOMAIN_CNN_INIT))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=layout)
    x = x.contiguous(memory_format=layout)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = seeded_generator(seed, DOMAIN_CNN_TRAIN)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def predict(net: SmallCNN, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    net.eval()
    return torch.cat([net(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def features(net: SmallCNN, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    net.eval()
    return torch.cat([net.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNFL_CACHE_DIR", Path.home() / ".cache" / "alignfl-audit"))


def domain_cnn(dataset: str, train_x: torch.Tensor, train_y: torch.Tensor, data_digest: str, seed: int,
               epochs: int) -> SmallCNN:
    """Train (or load from cache) the domain CNN of ``dataset``."""
    key = hashlib.sha256(f"{dataset}|{data_digest}|{seed}|{epochs}|v2".encode()).hexdigest()[:16]
    path = cache_dir() / "domain-cnn" / f"{dataset}-{key}.pt"
    net = SmallCNN(10)
    if path.is_file():
        try:
            net.load_state_dict(torch.load(path, weights_only=True))
            return net.eval()
        except Exception:  # a corrupt cache entry is rebuilt, never trusted
            path.unlink(missing_ok=True)
    net = fit_classifier(train_x, train_y, 10, epochs, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(net.state_dict(), tmp)
    tmp.replace(path)
    return net
