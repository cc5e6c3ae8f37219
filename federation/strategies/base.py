"""The strategy contract: the one place that knows a protocol, and nothing of transport.

In the spirit of Flower's Strategy, a strategy has two sides:

- the **server side** (``Strategy``) configures a round (``configure_round``: which clients take part
  and the typed ``Downlink`` each is sent) and aggregates the typed ``Uplink`` replies that arrive
  (``aggregate_round``);
- the **client side** (``ClientHandler``) handles one downlink on a client and returns one uplink.

An engine carries the messages (in-process, or Flower); the round loop writes every message, in both
directions, to ``shared/round-R/`` and validates it before anything uses it. A strategy never writes,
reads or sends a message itself.

A strategy declares its own config: ``Settings`` is its ``strategy:`` section (with a ``name`` field),
``ServerSettings`` its ``server:`` section (``None``: the strategy has no federation, so any ``server``
key is refused). A setting a strategy does not declare is refused with a one-line error naming the key.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from federation.client import Client, ClientSetup
from federation.errors import ConfigError
from federation.messages import Downlink, Uplink
from federation.privacy.ledger import DPEvent
from federation.rng import PARTICIPATION, seeded_generator
from federation.training import TrainSettings

STALE_POLICIES = ("keep", "drop", "weight")


@dataclass
class FederationSettings:
    """The ``server:`` settings every federated strategy shares.

    - ``participation``: the probability that the server selects a client for a round;
    - ``dropout``: clients that leave for good, ``{client: K, from_round: R}`` or a list of them
      (a simulated fault: from round R no message reaches client K and it never replies);
    - ``stale_policy``: what the server does with a contribution trained ``age`` rounds ago (a
      decoder it still holds, a reply that arrived late): ``keep`` it, ``drop`` it when
      ``age > max_staleness``, or ``weight`` it by ``staleness_decay ** age``."""

    participation: float = 1.0
    dropout: object = None
    stale_policy: str = "keep"
    max_staleness: int = 0
    staleness_decay: float = 0.5


@dataclass
class Departure:
    client: int
    from_round: int


def departures(settings: FederationSettings | None) -> list[Departure]:
    raw = getattr(settings, "dropout", None)
    if raw is None:
        return []
    entries = [raw] if isinstance(raw, dict) else raw
    return [Departure(int(e["client"]), int(e["from_round"])) for e in entries]


def check_federation(settings: FederationSettings, strategy: str, policies: tuple[str, ...], n_clients: int) -> None:
    if not 0 < settings.participation <= 1:
        raise ConfigError(f"server.participation must be in (0, 1], got {settings.participation}")
    if settings.stale_policy not in policies:
        raise ConfigError(f"server.stale_policy {settings.stale_policy!r} is not allowed for the {strategy} strategy; "
                          f"choose one of {list(policies)}")
    if settings.max_staleness < 0:
        raise ConfigError(f"server.max_staleness must be >= 0, got {settings.max_staleness}")
    if not 0 < settings.staleness_decay <= 1:
        raise ConfigError(f"server.staleness_decay must be in (0, 1], got {settings.staleness_decay}")
    raw = settings.dropout
    if raw is None:
        return
    entries = [raw] if isinstance(raw, dict) else raw
    if not isinstance(entries, list):
        raise ConfigError(f"server.dropout must be {{client: K, from_round: R}} or a list of them, got {raw!r}")
    seen = set()
    for e in entries:
        if not isinstance(e, dict) or set(e) != {"client", "from_round"} or not all(
                isinstance(e[k], int) and not isinstance(e[k], bool) for k in e):
            raise ConfigError(f"server.dropout entries must be {{client: K, from_round: R}} with integers, got {e!r}")
        if not 0 <= e["client"] < n_clients:
            raise ConfigError(f"server.dropout client {e['client']} is not a client (0..{n_clients - 1})")
        if e["from_round"] < 0:
            raise ConfigError(f"server.dropout from_round must be >= 0, got {e['from_round']}")
        if e["client"] in seen:
            raise ConfigError(f"server.dropout lists client {e['client']} twice")
        seen.add(e["client"])


def staleness_weight(settings: FederationSettings, age: int) -> float:
    """The weight a contribution of this age gets under the server's stale policy (0: not used)."""
    if settings.stale_policy == "keep":
        return 1.0
    if settings.stale_policy == "drop":
        return 1.0 if age <= settings.max_staleness else 0.0
    return settings.staleness_decay ** age


def select_clients(seed: int, rnd: int, available: list[int], probability: float) -> list[int]:
    """Each available client is selected with ``probability``, from its own (seed, round, client) draw."""
    if probability >= 1.0:
        return sorted(available)
    return sorted(c for c in available
                  if bool(torch.rand((), generator=seeded_generator(seed, PARTICIPATION, rnd, c)) < probability))


@dataclass
class ServerContext:
    """What a strategy's server side is built with."""

    seed: int
    training: TrainSettings  # the recipe (rounds, epochs, batch size, learning rate, KL weight)
    client_ids: list[int]
    client_specs: dict[int, dict]
    server_spec: dict  # the global model's spec
    pooled: ClientSetup | None = None  # only for a strategy without federation: all client records
    # each client's label set from the partition config (public, as the partition config is)
    label_sets: dict[int, list[int]] = field(default_factory=dict)


@dataclass
class Aggregate:
    """What the server did with a round's replies."""

    server_loss: float | None = None
    used: dict[int, float] = field(default_factory=dict)  # client -> weight its contribution got this round
    dp_events: list[DPEvent] = field(default_factory=list)  # only a strategy that trains on records itself


class ClientHandler(ABC):
    """The client side of a strategy: one downlink in, one uplink out."""

    downlink_kinds: ClassVar[tuple[str, ...]]

    def make_client(self, setup: ClientSetup, state: dict | None, rnd: int):
        """The client as it stands at the start of round ``rnd``, rebuilt from its saved state (which its
        ``state_dict`` returns again after the round)."""
        return Client(setup, state, rnd)

    def check_downlink(self, setup: ClientSetup, downlink: Downlink) -> None:
        """Refuse a validated downlink this client cannot use (raise ``UploadRejected`` with the reason)."""

    @abstractmethod
    def handle(self, client: Client, downlink: Downlink) -> Uplink: ...


class Strategy(ABC):
    """The server side of a strategy. Subclasses set the class attributes and implement the two round
    methods; ``client_handler`` builds the client side from the same settings."""

    name: ClassVar[str]
    Settings: ClassVar[type]
    ServerSettings: ClassVar[type | None]
    uplink_kinds: ClassVar[tuple[str, ...]] = ()
    downlink_kinds: ClassVar[tuple[str, ...]] = ()
    stale_policies: ClassVar[tuple[str, ...]] = STALE_POLICIES
    privacy_mechanisms: ClassVar[tuple[str, ...]] = ("none", "dp-sgd", "lcd", "lcd-spectral")
    same_architecture: ClassVar[bool] = False  # True: every client must share one model spec
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16")  # the training.precision values it implements

    def __init__(self, settings, server, ctx: ServerContext):
        self.settings, self.server_settings, self.ctx = settings, server, ctx

    # ------------------------------------------------------------------ declared properties
    @classmethod
    def federated(cls) -> bool:
        return cls.ServerSettings is not None

    @classmethod
    def check(cls, settings, server, n_clients: int) -> None:
        """Checks of the strategy's own sections (the common federation settings are checked here)."""
        if server is not None:
            check_federation(server, cls.name, cls.stale_policies, n_clients)

    @classmethod
    def check_setup(cls, settings, specs: list[dict], privacy) -> None:
        """Checks that need the clients' model specs or the privacy section (after both are validated)."""

    @classmethod
    def training_units(cls, settings, training: TrainSettings, specs: list[dict],
                       tensors: list[torch.Tensor]) -> list[tuple[dict, torch.Tensor, TrainSettings]]:
        """(spec, records, recipe) per client; a strategy without federation pools them."""
        return [(spec, x, training) for spec, x in zip(specs, tensors)]

    @classmethod
    @abstractmethod
    def client_handler(cls, settings, server) -> ClientHandler:
        """The client side, built from the strategy's and the server's settings (every engine calls it
        on the client)."""

    @property
    def rounds(self) -> int:
        return self.ctx.training.rounds

    @property
    @abstractmethod
    def shared_artifacts(self) -> list[str]:
        """What leaves a client (uplink) or the server (downlink), by name; [] when nothing is shared."""

    # ------------------------------------------------------------------ the protocol
    @abstractmethod
    def configure_round(self, rnd: int, available: list[int]) -> dict[int, Downlink]:
        """Which clients take part in round ``rnd`` and what each is sent. Clients sent the same
        ``Downlink`` object receive one broadcast message."""

    def check_uplink(self, uplink: Uplink) -> None:
        """Refuse a validated reply the server cannot use (raise ``UploadRejected`` with the reason): it is
        then recorded as rejected and never reaches ``aggregate_round``."""

    @abstractmethod
    def aggregate_round(self, rnd: int, replies: list[Uplink]) -> Aggregate:
        """Use the validated replies that arrived in round ``rnd`` (sorted by client; a reply's ``round``
        is the round it was trained in, so ``rnd - reply.round`` is its staleness)."""

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, shared_root: Path) -> None:
        pass

    # ------------------------------------------------------------------ what the metrics evaluate
    @property
    @abstractmethod
    def global_vae(self) -> torch.nn.Module: ...

    def client_decoders(self) -> dict[int, torch.nn.Module]:
        """The server's view of each client's decoder (for figures)."""
        return {}

    def synthetic_set(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-client synthetic data labelled by client (TSTR), or None when the strategy has none."""
        return None
