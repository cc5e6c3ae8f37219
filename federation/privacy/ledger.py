"""The privacy ledger: every DP-SGD round of every client, as it happened.

Each client records its own DP events and sends them with its reply; the server merges them here, in
(client, round) order, so the ledger does not depend on the order replies arrived in. Accounting is a
pure function of these records (``alignfl_audit.accounting``); the trainer never reports an epsilon of
its own."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

FORMAT = "alignfl-ledger/2"


@dataclass
class DPEvent:
    client: int
    round: int
    sample_rate: float
    noise_multiplier: float
    steps: int
    clipping: str
    scope: str
    grad_sample_mode: str
    clip_bound_start: float
    clip_bound_end: float


@dataclass
class PrivacyLedger:
    mechanism: str = "none"
    formal_guarantee: bool = False
    note: str = ""
    delta: float | None = None
    target_epsilon: float | None = None
    clients: dict = field(default_factory=dict)  # client id (str) -> {"n": records, "noise_multiplier": sigma}
    events: list[DPEvent] = field(default_factory=list)
    # client id (str) -> why some of its DP spend could not be read (a rejected reply with an unreadable
    # report): its epsilon is withheld, never under-counted
    unaccounted: dict = field(default_factory=dict)

    def record(self, event: DPEvent) -> None:
        self.events.append(event)

    def merge(self, events: list[DPEvent], unaccounted: dict[int, str] | None = None) -> None:
        """Add a report's events: one event per (client, round); a client's reports repeat its whole
        history, so a repeated event is the same event, and a different one for the same round leaves
        that client's spend unknown."""
        held = {(e.client, e.round): e for e in self.events}
        for e in events:
            old = held.setdefault((e.client, e.round), e)
            if old != e:
                self.unaccounted.setdefault(str(e.client), f"two different DP reports for round {e.round}")
        self.events = sorted(held.values(), key=lambda e: (e.client, e.round))
        for client, reason in (unaccounted or {}).items():
            self.unaccounted.setdefault(str(client), reason)

    def history(self, client: int) -> list[tuple[float, float, int]]:
        """(noise multiplier, sampling rate, steps) per event, in order: the accountants' input."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.events if e.client == client]

    def client_ids(self) -> list[int]:
        return sorted({e.client for e in self.events} | {int(c) for c in self.clients})

    def to_json(self) -> dict:
        return {"format": FORMAT, **{k: v for k, v in asdict(self).items() if k != "events"},
                "events": [asdict(e) for e in sorted(self.events, key=lambda e: (e.client, e.round))]}

    @classmethod
    def from_json(cls, data: dict) -> "PrivacyLedger":
        events = [DPEvent(**e) for e in data.get("events", [])]
        return cls(**{k: v for k, v in data.items() if k not in ("events", "format")}, events=events)
