"""Centralized upper reference: the same VAE trained on the pooled client data (outliers included),
where the data are, in one round of ``strategy.epochs`` epochs. There is no federation: no message is
sent, nothing is shared, and the strategy takes no ``server:`` settings."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from federation.client import Client
from federation.errors import ConfigError
from federation.messages import Downlink, Uplink
from federation.strategies.base import Aggregate, ClientHandler, Strategy
from federation.training import TrainSettings


@dataclass
class CentralizedSettings:
    name: str = "centralized"
    epochs: int = 10  # epochs over the pooled client data


class Centralized(Strategy):
    name = "centralized"
    Settings = CentralizedSettings
    ServerSettings = None

    def __init__(self, settings, server, ctx):
        super().__init__(settings, server, ctx)
        self.model: Client | None = None

    @classmethod
    def check(cls, settings: CentralizedSettings, server, n_clients: int) -> None:
        if settings.epochs <= 0:
            raise ConfigError(f"strategy.epochs must be > 0, got {settings.epochs}")

    @classmethod
    def training_units(cls, settings: CentralizedSettings, training: TrainSettings, specs, tensors):
        pooled = dataclasses.replace(training, rounds=1, local_epochs=settings.epochs)
        return [(specs[0], torch.cat(tensors), pooled)]

    @classmethod
    def client_handler(cls, settings, server) -> ClientHandler:
        raise TypeError("the centralized reference has no clients to message")

    @property
    def rounds(self) -> int:
        return 1

    @property
    def shared_artifacts(self) -> list[str]:
        return []

    def configure_round(self, rnd: int, available: list[int]) -> dict[int, Downlink]:
        return {}

    def aggregate_round(self, rnd: int, replies: list[Uplink]) -> Aggregate:
        self.model = Client(self.ctx.pooled, None, rnd)
        loss, events = self.model.train_round()
        return Aggregate(loss, {}, events)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict() if self.model is not None else None}

    def load_state_dict(self, state: dict, shared_root: Path) -> None:
        if state["model"] is not None:
            self.model = Client(self.ctx.pooled, state["model"], 1)

    @property
    def global_vae(self):
        return self.model.vae
