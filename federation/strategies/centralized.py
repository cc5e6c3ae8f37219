"""Centralized upper reference: the same VAE trained on the pooled client data (outliers included).
Nothing is shared; it is one "round" of ``epochs`` epochs."""
from __future__ import annotations

from pathlib import Path

import torch

from federation.client import Client
from federation.training import TrainSettings


class Centralized:
    name = "centralized"
    shared_artifacts: list[str] = []
    rounds = 1

    def __init__(self, clients: list[Client], settings: TrainSettings, server_spec: dict, seed: int, *,
                 epochs: int, **_):
        pooled = torch.cat([c.data for c in clients])
        pooled_settings = TrainSettings(rounds=1, local_epochs=epochs, batch_size=settings.batch_size, lr=settings.lr,
                              lambda_kl=settings.lambda_kl)
        self.model = Client(-1, server_spec, pooled, pooled_settings, seed)

    def run_round(self, rnd: int, shared_dir: Path, tick=lambda msg: None) -> dict:
        tick("centralized training")
        return {"round": rnd, "rejected": {}, "server_loss": self.model.train_round()}

    @property
    def global_vae(self):
        return self.model.vae

    def client_decoders(self) -> dict:
        return {}

    def synthetic_set(self):
        return None
