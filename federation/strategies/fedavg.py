"""FedAvg and FedProx baselines: the server sends its global VAE down, clients train it and send their
whole VAE back, the server averages all parameters weighted by sample count. FedProx adds
mu/2 * ||w - w_global||^2 to the local loss."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from federation.client import Client
from federation.errors import ConfigError
from federation.messages import ClientReport, Downlink, Payload, Uplink, load_uplink
from federation.models import VAE, load_vae
from federation.rng import SERVER_INIT, SERVER_ROUND, seeded_generator
from federation.strategies.base import (Aggregate, ClientHandler, FederationSettings, Strategy, select_clients,
                                        staleness_weight)
from federation.training import decode


@dataclass
class FedAvgSettings:
    name: str = "fedavg"


@dataclass
class FedProxSettings:
    name: str = "fedprox"
    mu: float = 0.01  # proximal weight


@dataclass
class FedAvgServerSettings(FederationSettings):
    samples_per_client: int = 1000  # synthetic samples per uploaded decoder, for TSTR
    stale_policy: str = "drop"  # a late update is averaged in once, with weight by policy; never kept


class FedAvgClient(ClientHandler):
    downlink_kinds = ("vae",)

    def __init__(self, mu: float):
        self.mu = mu

    def handle(self, client: Client, downlink: Downlink) -> Uplink:
        global_state = downlink.payload.tensors
        client.load_global(global_state)
        client.reset_optimizer()  # FedAvg's client policy: each round starts from the global model anew
        ref = {k: v.detach().clone() for k, v in global_state.items()} if self.mu > 0 else None
        loss, events = client.train_round(self.mu, ref)
        if client.budget_exhausted:  # it trained nothing: what it sends back is the global model it was sent
            report = ClientReport("budget-exhausted", None, events)
        else:
            report = ClientReport("trained", None if client.dp is not None else loss, events)
        return Uplink(client.id, downlink.round, client.vae_payload(), client.setup.num_samples, report)


class FedAvg(Strategy):
    name = "fedavg"
    Settings = FedAvgSettings
    ServerSettings = FedAvgServerSettings
    uplink_kinds = ("vae",)
    downlink_kinds = ("vae",)
    # 'keep' means using a client's last contribution in every later round: FedAvg averages each
    # round's updates into one model, so a stale update is averaged in once (weighted) or dropped
    stale_policies = ("drop", "weight")
    privacy_mechanisms = ("none",)
    same_architecture = True

    def __init__(self, settings, server: FedAvgServerSettings, ctx):
        super().__init__(settings, server, ctx)
        self.spec = ctx.client_specs[ctx.client_ids[0]]
        self._global = VAE(self.spec, seeded_generator(ctx.seed, SERVER_INIT))
        self.global_state = {k: v.clone() for k, v in self._global.state_dict().items()}
        self.last_uploads: dict[int, tuple[Uplink, int]] = {}  # client -> (upload, arrival round)

    @property
    def prox_mu(self) -> float:
        return getattr(self.settings, "mu", 0.0)

    @classmethod
    def check(cls, settings, server: FedAvgServerSettings, n_clients: int) -> None:
        super().check(settings, server, n_clients)
        if server.samples_per_client <= 0:
            raise ConfigError(f"server.samples_per_client must be > 0, got {server.samples_per_client}")
        if not getattr(settings, "mu", 0.0) >= 0:
            raise ConfigError(f"strategy.mu must be >= 0, got {settings.mu}")

    @classmethod
    def client_handler(cls, settings, server) -> FedAvgClient:
        return FedAvgClient(getattr(settings, "mu", 0.0))

    @property
    def shared_artifacts(self) -> list[str]:
        return ["vae", "vae_spec", "global_vae (downlink)"]

    def configure_round(self, rnd: int, available: list[int]) -> dict[int, Downlink]:
        selected = select_clients(self.ctx.seed, rnd, available, self.server_settings.participation)
        if not selected:
            return {}
        down = Downlink(rnd, tuple(selected), Payload("vae", dict(self.spec), dict(self.global_state)))
        return {c: down for c in selected}

    def aggregate_round(self, rnd: int, replies: list[Uplink]) -> Aggregate:
        weights, used = {}, {}
        for up in replies:
            w = staleness_weight(self.server_settings, rnd - up.round)
            self.last_uploads[up.client] = (up, rnd)
            used[up.client] = w
            if w > 0:
                weights[up.client] = (up, w * up.num_samples)
        if weights:
            total = sum(w for _, w in weights.values())
            self.global_state = {
                k: sum(up.tensors[k].double() * (w / total) for up, w in weights.values()).to(ref.dtype)
                for k, ref in self.global_state.items()}
            self._global.load_state_dict(self.global_state)
        return Aggregate(None, used)

    def state_dict(self) -> dict:
        return {"global_state": self.global_state,
                "last_uploads": {str(cid): arrived for cid, (_, arrived) in self.last_uploads.items()}}

    def load_state_dict(self, state: dict, shared_root: Path) -> None:
        self.global_state = state["global_state"]
        self._global.load_state_dict(self.global_state)
        self.last_uploads = {int(cid): (load_uplink(shared_root / f"round-{rnd}" / f"client-{cid}.safetensors"), rnd)
                             for cid, rnd in state["last_uploads"].items()}

    @property
    def global_vae(self):
        return self._global

    def client_decoders(self) -> dict[int, torch.nn.Module]:
        return {cid: load_vae(up.spec, up.tensors).decoder for cid, (up, _) in sorted(self.last_uploads.items())}

    def synthetic_set(self):
        generator = seeded_generator(self.ctx.seed, SERVER_ROUND, self.rounds)
        xs, ys = [], []
        n = self.server_settings.samples_per_client
        for cid, dec in sorted(self.client_decoders().items()):
            z = torch.randn(n, self.spec["latent_dim"], generator=generator)
            xs.append(decode(dec, z))
            ys.append(torch.full((n,), cid, dtype=torch.long))
        return (torch.cat(xs), torch.cat(ys)) if xs else None


class FedProx(FedAvg):
    name = "fedprox"
    Settings = FedProxSettings
