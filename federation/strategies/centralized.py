"""Centralized upper reference: the same VAE trained on the pooled client data (outliers included).
Nothing is shared. The orchestrator hands it a single pooled "client" whose local epochs are the
reference's epochs; it runs as one round."""
from __future__ import annotations

from pathlib import Path

from federation.client import Client
from federation.training import TrainSettings


class Centralized:
    name = "centralized"
    shared_artifacts: list[str] = []
    rounds = 1

    def __init__(self, clients: list[Client], settings: TrainSettings, server_spec: dict, seed: int, **_):
        (self.model,) = clients

    def run_round(self, rnd: int, shared_dir: Path, tick=lambda msg: None) -> dict:
        tick("centralized training")
        return {"round": rnd, "rejected": {}, "server_loss": self.model.train_round()}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, shared_root: Path) -> None:
        pass

    @property
    def global_vae(self):
        return self.model.vae

    def client_decoders(self) -> dict:
        return {}

    def synthetic_set(self):
        return None
