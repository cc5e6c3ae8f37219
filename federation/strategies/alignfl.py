"""ALIGN-FL: clients upload only their decoders; the server trains a global VAE on synthetic data."""
from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from federation.client import Client
from federation.errors import ConfigError
from federation.messages import ClientReport, Downlink, Payload, Uplink
from federation.server import AlignFLServer
from federation.strategies.base import (Aggregate, ClientHandler, FederationSettings, Strategy, select_clients,
                                        staleness_weight)


@dataclass
class AlignFLSettings:
    name: str = "alignfl"


@dataclass
class AlignFLServerSettings(FederationSettings):
    samples_per_client: int = 1000  # synthetic samples decoded from each client's decoder per round
    epochs: int = 5  # global-VAE epochs per round
    sampling: str = "prior"  # prior | gmm (gmm: each client also shares a latent GMM, an extra artifact)
    gmm_components: int = 10
    model: typing.Optional[dict] = None  # the global VAE's spec; default: the clients' default model


class AlignFLClient(ClientHandler):
    downlink_kinds = ("empty",)

    def __init__(self, gmm_components: int):
        self.gmm_components = gmm_components

    def handle(self, client: Client, downlink: Downlink) -> Uplink:
        loss, events = client.train_round()
        if loss is None:  # budget spent: nothing new leaves the client; the server keeps its last decoder
            return Uplink(client.id, downlink.round, Payload("empty"), client.setup.num_samples,
                          ClientReport("budget-exhausted", None, events))
        report = ClientReport("trained", None if client.dp is not None else loss, events)
        return Uplink(client.id, downlink.round, client.decoder_payload(self.gmm_components),
                      client.setup.num_samples, report)


class AlignFL(Strategy):
    name = "alignfl"
    Settings = AlignFLSettings
    ServerSettings = AlignFLServerSettings
    uplink_kinds = ("decoder", "empty")
    downlink_kinds = ("empty",)

    def __init__(self, settings: AlignFLSettings, server: AlignFLServerSettings, ctx):
        super().__init__(settings, server, ctx)
        self.server = AlignFLServer(ctx.server_spec, ctx.training, ctx.seed, server.sampling)
        self.last_synthetic: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def check(cls, settings, server: AlignFLServerSettings, n_clients: int) -> None:
        super().check(settings, server, n_clients)
        for key in ("samples_per_client", "epochs", "gmm_components"):
            if getattr(server, key) <= 0:
                raise ConfigError(f"server.{key} must be > 0, got {getattr(server, key)}")
        if server.sampling not in ("prior", "gmm"):
            raise ConfigError(f"server.sampling must be prior or gmm, not {server.sampling!r}")

    @classmethod
    def client_handler(cls, settings, server: AlignFLServerSettings) -> AlignFLClient:
        return AlignFLClient(server.gmm_components if server.sampling == "gmm" else 0)

    @property
    def shared_artifacts(self) -> list[str]:
        return ["decoder", "decoder_spec"] + (["latent_gmm"] if self.server_settings.sampling == "gmm" else [])

    def configure_round(self, rnd: int, available: list[int]) -> dict[int, Downlink]:
        selected = select_clients(self.ctx.seed, rnd, available, self.server_settings.participation)
        if not selected:
            return {}
        instruction = Downlink(rnd, tuple(selected), Payload("empty"))  # "train this round": no tensors
        return {c: instruction for c in selected}

    def aggregate_round(self, rnd: int, replies: list[Uplink]) -> Aggregate:
        for up in replies:
            if up.kind == "decoder":
                self.server.accept(up, rnd)
        s = self.server_settings
        weights = {cid: staleness_weight(s, rnd - held.trained) for cid, held in self.server.decoders.items()}
        counts = {cid: int(round(s.samples_per_client * w)) for cid, w in weights.items()}
        if not any(n > 0 for n in counts.values()):
            return Aggregate(None, weights)
        generator = self.server.round_generator(rnd)
        x, y = self.server.synthesize(counts, generator)
        loss = self.server.train_global(x, s.epochs, generator)
        self.last_synthetic = (x, y)
        return Aggregate(loss, weights)

    def state_dict(self) -> dict:
        return {"server": self.server.state_dict(),
                "last_synthetic": list(self.last_synthetic) if self.last_synthetic is not None else None}

    def load_state_dict(self, state: dict, shared_root: Path) -> None:
        self.server.load_state_dict(state["server"], shared_root)
        self.last_synthetic = tuple(state["last_synthetic"]) if state["last_synthetic"] is not None else None

    @property
    def global_vae(self):
        return self.server.vae

    def client_decoders(self) -> dict[int, torch.nn.Module]:
        return {cid: held.decoder for cid, held in self.server.decoders.items()}

    def synthetic_set(self):
        return self.last_synthetic
