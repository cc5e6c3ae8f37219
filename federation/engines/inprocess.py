"""The in-process engine: every client runs in this process, one after the other.

It goes through the same client path as a Flower node (encoded downlink in, encoded reply and saved
state out). Asynchrony is simulated, deterministically: with ``straggler_probability`` a client's reply
to round r arrives ``1..straggler_max_delay`` rounds late (drawn from the client's own (seed, round,
client) stream); until then the client is busy and is sent nothing new.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from federation.client import ClientSetup
from federation.engines.base import Arrival, ClientFailure, Engine, Exchange, handle_encoded
from federation.errors import ConfigError
from federation.rng import STRAGGLERS, seeded_generator
from federation.strategies.base import ClientHandler


@dataclass
class InProcessSettings:
    name: str = "inprocess"
    straggler_probability: float = 0.0  # per client and round: the reply arrives late
    straggler_max_delay: int = 1  # a late reply arrives 1..this many rounds late

    def check(self) -> None:
        if not 0 <= self.straggler_probability < 1:
            raise ConfigError(f"engine.straggler_probability must be in [0, 1), got {self.straggler_probability}")
        if self.straggler_max_delay < 1:
            raise ConfigError(f"engine.straggler_max_delay must be >= 1, got {self.straggler_max_delay}")


class InProcessEngine(Engine):
    name = "inprocess"

    def __init__(self, settings: InProcessSettings, setups: dict[int, ClientSetup], handler: ClientHandler,
                 seed: int):
        self.settings, self.setups, self.handler, self.seed = settings, setups, handler, seed
        self.states: dict[int, dict | None] = {k: None for k in setups}
        self.pending: list[tuple[int, Arrival]] = []  # (due round, reply)

    def _order(self, clients: list[int]) -> list[int]:
        """The order clients run in; results do not depend on it (tests reverse it)."""
        return sorted(clients)

    def _delay(self, rnd: int, client: int) -> int:
        p = self.settings.straggler_probability
        if p <= 0:
            return 0
        g = seeded_generator(self.seed, STRAGGLERS, rnd, client)
        if float(torch.rand((), generator=g)) >= p:
            return 0
        return 1 + int(torch.randint(0, self.settings.straggler_max_delay, (), generator=g))

    def client_facts(self) -> dict[int, dict]:
        return {k: {"noise": s.noise_source} for k, s in self.setups.items()}

    def busy(self) -> set[int]:
        return {a.client for _, a in self.pending}

    def exchange(self, rnd: int, downlinks: dict[int, tuple[bytes, dict]]) -> Exchange:
        out = Exchange()
        due = [a for when, a in self.pending if when <= rnd]
        self.pending = [(when, a) for when, a in self.pending if when > rnd]
        out.arrivals.extend(due)
        for cid in self._order(list(downlinks)):
            blob, meta = downlinks[cid]
            try:
                rblob, rmeta, self.states[cid] = handle_encoded(self.setups[cid], self.handler, self.states[cid],
                                                                blob, meta)
            except ClientFailure as err:
                out.failed[cid] = str(err)
                continue
            arrival = Arrival(cid, rnd, rblob, rmeta)
            delay = self._delay(rnd, cid)
            if delay:
                self.pending.append((rnd + delay, arrival))
                out.no_reply.append(cid)
            else:
                out.arrivals.append(arrival)
        return out

    def drain(self, last_round: int) -> list[Arrival]:
        out = [a for _, a in sorted(self.pending, key=lambda p: (p[1].client, p[1].sent_round))]
        self.pending = []
        return out

    def state_dict(self) -> dict:
        return {"states": {str(k): v for k, v in self.states.items()},
                "pending": [{"due": when, "client": a.client, "sent_round": a.sent_round,
                             "blob": torch.frombuffer(bytearray(a.blob), dtype=torch.uint8), "meta": a.meta}
                            for when, a in self.pending]}

    def load_state_dict(self, state: dict) -> None:
        self.states = {int(k): v for k, v in state["states"].items()}
        self.pending = [(p["due"], Arrival(p["client"], p["sent_round"], bytes(p["blob"].numpy().tobytes()), p["meta"]))
                        for p in state["pending"]]
