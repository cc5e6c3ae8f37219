"""The engine contract: an engine carries a strategy's encoded messages between the server and the
clients, and knows nothing of the protocol.

The server side of every engine takes the round's encoded downlinks (one per recipient) and returns
the encoded uplinks that arrived (``Exchange``): this round's replies and late replies to earlier
rounds. Replies are returned exactly as received; the round loop writes them to ``shared/`` and
validates them before use. The client side of every engine is ``handle_encoded``: a client validates
the downlink, is rebuilt from its saved state, runs the strategy's client handler, and returns its
encoded reply and its new state.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from federation.client import ClientSetup
from federation.errors import UploadRejected
from federation.messages import decode, encode
from federation.strategies.base import ClientHandler


@dataclass
class Arrival:
    """An encoded uplink as it arrived: from ``client`` (the engine's word for who sent it, e.g. a
    pinned Flower node), answering the downlink of round ``sent_round``."""

    client: int
    sent_round: int
    blob: bytes
    meta: object


@dataclass
class Exchange:
    arrivals: list[Arrival] = field(default_factory=list)
    no_reply: list[int] = field(default_factory=list)  # sent this round, no reply by the deadline
    failed: dict[int, str] = field(default_factory=dict)  # the client refused the message: it trained nothing
    lost: dict[int, str] = field(default_factory=dict)  # a reply came back unusable: the client may have trained


class Engine(ABC):
    name: ClassVar[str]

    def start(self) -> None:
        """Get ready for the first round (e.g. wait for nodes and pin them to client ids)."""

    def busy(self) -> set[int]:
        """Clients still working on an earlier round's message (they are sent nothing new)."""

    @abstractmethod
    def exchange(self, rnd: int, downlinks: dict[int, tuple[bytes, dict]]) -> Exchange:
        """Deliver each client its encoded downlink; return what arrived during this round."""

    def drain(self, last_round: int) -> list[Arrival]:
        """Replies still outstanding after the last round, as far as they arrive."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


class ClientFailure(Exception):
    """A client refused its message before training anything (the reason is sent back instead of a reply)."""


def handle_encoded(setup: ClientSetup, handler: ClientHandler, state: dict | None, blob: bytes,
                   meta) -> tuple[bytes, dict, dict]:
    """The client side of every engine: (reply blob, reply sidecar, new state)."""
    try:
        down = decode(blob, meta, direction="downlink", name=f"downlink to client {setup.client}",
                      kinds=handler.downlink_kinds)
    except UploadRejected as err:
        raise ClientFailure(f"client {setup.client} rejected its downlink: {err}") from None
    if setup.client not in down.recipients:
        raise ClientFailure(f"client {setup.client} received a downlink addressed to {list(down.recipients)}")
    if state is not None and down.round <= int(state["round"]):
        raise ClientFailure(f"client {setup.client} was sent round {down.round} after it trained round "
                            f"{state['round']}; a client trains each round at most once")
    try:
        handler.check_downlink(setup, down)
    except UploadRejected as err:
        raise ClientFailure(f"client {setup.client} rejected its downlink: {err}") from None
    client = handler.make_client(setup, state, down.round)
    reply = handler.handle(client, down)
    blob, meta = encode(reply)
    return blob, meta, client.state_dict()
