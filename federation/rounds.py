"""One federated round, engine- and strategy-agnostic, and its typed record.

``run_round``: the strategy configures the round; every downlink is written to ``shared/round-R/`` and
validated; the engine delivers it (except to clients that have left the federation, a simulated
fault); every reply that arrives is written to ``shared/round-R/`` exactly as received, validated, and
only then handed to the strategy, sorted by client, so that neither the engine's order nor the arrival
order changes a result. The round's record says what happened to every client.
"""
from __future__ import annotations

import time

from dataclasses import dataclass, field
from pathlib import Path

from federation.engines.base import Arrival, Engine
from federation.errors import FederationError, UploadRejected
from federation.messages import (ClientReport, Uplink, decode_report, encode, file_stem, load_downlink, load_uplink,
                                 write_encoded)
from federation.privacy.ledger import DPEvent
from federation.strategies.base import Departure, Strategy

# what happened to a client in a round
NOT_SELECTED = "not-selected"  # the server did not select it
LEFT = "left"  # it has left the federation: nothing reaches it any more
BUSY = "busy"  # still working on an earlier round's message
NO_REPLY = "no-reply"  # sent a message, no reply by the round's deadline
REPLIED = "replied"  # replied in time
LATE_REPLY = "late-reply"  # a reply to an earlier round arrived this round
BUDGET_SPENT = "budget-spent"  # replied that its privacy budget is spent (nothing shared)
REJECTED = "rejected"  # its reply failed validation and was not used
FAILED = "failed"  # it refused the message before training anything
LOST = "lost"  # its reply came back unusable (broken, from the wrong node): it may have trained
STATUSES = (NOT_SELECTED, LEFT, BUSY, NO_REPLY, REPLIED, LATE_REPLY, BUDGET_SPENT, REJECTED, FAILED, LOST)
DELIVERED = (NO_REPLY, REPLIED, BUDGET_SPENT, REJECTED, FAILED, LOST)  # a message reached the client this round


@dataclass
class ClientRound:
    status: str
    loss: float | None = None  # from the reply that arrived this round (withheld under DP-SGD)
    staleness: int | None = None  # rounds between the reply's training and its arrival
    weight: float | None = None  # what the server's stale policy gave its contribution this round
    reason: str = ""  # why a reply was rejected or failed


@dataclass
class RoundRecord:
    round: int
    clients: dict[int, ClientRound]
    server_loss: float | None = None
    probe: dict = field(default_factory=dict)

    @property
    def rejected(self) -> dict[int, str]:
        return {k: c.reason for k, c in self.clients.items() if c.status in (REJECTED, FAILED, LOST)}

    def to_json(self) -> dict:
        return {"round": self.round, "clients": {str(k): vars(c).copy() for k, c in self.clients.items()},
                "server_loss": self.server_loss, "probe": dict(self.probe)}

    @classmethod
    def from_json(cls, data: dict) -> "RoundRecord":
        return cls(data["round"], {int(k): ClientRound(**c) for k, c in data["clients"].items()},
                   data["server_loss"], dict(data["probe"]))

    def row(self) -> dict:
        """The round's line in rounds.csv (columns in ``federation.run_layout.ROUND_COLUMNS``)."""
        out: dict = {"round": self.round}
        for k in sorted(self.clients):
            c = self.clients[k]
            out[f"client{k}_participated"] = c.status in DELIVERED
            out[f"client{k}_status"] = c.status
            out[f"client{k}_loss"] = c.loss
            out[f"client{k}_staleness"] = c.staleness
            out[f"client{k}_weight"] = c.weight
        out["server_loss"] = self.server_loss
        out.update(self.probe)
        return out


@dataclass
class Accepted:
    uplinks: list[Uplink]
    dp_events: list[DPEvent]
    unaccounted: dict[int, str]  # client -> why its DP spend in a rejected reply could not be read


def departed(departures: list[Departure], client: int, rnd: int) -> bool:
    return any(d.client == client and rnd >= d.from_round for d in departures)


def record_downlinks(plan: dict, shared_dir: Path, kinds: tuple[str, ...]) -> dict[int, tuple[bytes, dict]]:
    """Write each distinct downlink once, validate it as read back, and return each recipient's bytes."""
    encoded: dict[int, tuple[bytes, dict]] = {}
    for down in {id(d): d for d in plan.values()}.values():
        addressed = sorted(c for c, d in plan.items() if d is down)
        if sorted(down.recipients) != addressed:
            raise FederationError(f"round {down.round}: a downlink names recipients {sorted(down.recipients)} "
                                  f"but is sent to {addressed}")
        blob, meta = encode(down)
        path = write_encoded(blob, meta, shared_dir, file_stem("downlink", down.recipients))
        try:
            load_downlink(path, kinds=kinds)
        except UploadRejected as err:
            raise FederationError(f"the server's downlink failed validation: {err}") from None
        for c in addressed:
            encoded[c] = (blob, meta)
    return encoded


def accept_arrivals(arrivals: list[Arrival], shared_dir: Path, kinds: tuple[str, ...],
                    statuses: dict[int, ClientRound], rnd: int, check=None) -> Accepted:
    """Write every reply as received, then validate it (and, with ``check``, the strategy's own check of a
    valid reply); a valid reply's DP events are accepted even when they come with nothing else, and the DP
    report of an invalid reply is still read when it can be."""
    uplinks, events, unaccounted = [], [], {}
    for a in sorted(arrivals, key=lambda a: (a.client, a.sent_round)):
        path = write_encoded(a.blob, a.meta if isinstance(a.meta, dict) else {"invalid_sidecar": repr(a.meta)[:200]},
                             shared_dir, file_stem("uplink", a.client))
        late = a.sent_round < rnd
        try:
            up = load_uplink(path, kinds=kinds)
            if up.round != a.sent_round:
                raise UploadRejected(f"{path.name}: answers round {up.round} but was sent in round {a.sent_round}")
            if up.client != a.client:
                raise UploadRejected(f"{path.name}: came from client {a.client} but says it is client {up.client}")
            if check is not None:
                check(up)
        except UploadRejected as err:
            statuses[a.client] = ClientRound(REJECTED, staleness=rnd - a.sent_round, reason=str(err))
            report = _salvage_report(a, str(err))
            if isinstance(report, ClientReport):
                events += report.dp_events
            else:
                unaccounted[a.client] = report
            continue
        status = BUDGET_SPENT if up.report.status == "budget-exhausted" else (LATE_REPLY if late else REPLIED)
        statuses[a.client] = ClientRound(status, up.report.loss, rnd - a.sent_round)
        events += up.report.dp_events
        uplinks.append(up)
    return Accepted(uplinks, events, unaccounted)


def _salvage_report(a: Arrival, reason: str) -> ClientReport | str:
    try:
        return decode_report(a.meta.get("report"), a.client, "report") if isinstance(a.meta, dict) else reason
    except UploadRejected as err:
        return f"rejected reply with an unreadable DP report ({err})"


def run_round(rnd: int, strategy: Strategy, engine: Engine, shared_dir: Path, departures: list[Departure],
              client_ids: list[int], timing: dict | None = None) -> tuple[RoundRecord, Accepted]:
    """``timing``: seconds are added under "clients" (the engine's exchange: the clients' work and the
    transport) and "server" (the strategy's aggregation)."""
    timing = {} if timing is None else timing
    t0 = time.perf_counter()
    busy = engine.busy()
    statuses = {k: ClientRound(LEFT if departed(departures, k, rnd) else BUSY if k in busy else NOT_SELECTED)
                for k in client_ids}
    available = [k for k in client_ids if k not in busy]
    plan = strategy.configure_round(rnd, available)
    unknown = set(plan) - set(available)
    if unknown:
        raise FederationError(f"round {rnd}: the strategy addressed clients {sorted(unknown)}, which are not available")
    encoded = record_downlinks(plan, shared_dir, strategy.downlink_kinds) if plan else {}
    deliver = {k: v for k, v in encoded.items() if not departed(departures, k, rnd)}
    exchange = engine.exchange(rnd, deliver)
    for k in exchange.no_reply:
        statuses[k] = ClientRound(NO_REPLY)
    for k, reason in exchange.failed.items():
        statuses[k] = ClientRound(FAILED, reason=reason)
    for k, reason in exchange.lost.items():
        statuses[k] = ClientRound(LOST, reason=reason)
    accepted = accept_arrivals(exchange.arrivals, shared_dir, strategy.uplink_kinds, statuses, rnd,
                               strategy.check_uplink)
    t1 = time.perf_counter()
    aggregate = strategy.aggregate_round(rnd, accepted.uplinks)
    timing["clients"] = timing.get("clients", 0.0) + t1 - t0
    timing["server"] = timing.get("server", 0.0) + time.perf_counter() - t1
    for k, w in aggregate.used.items():
        statuses[k].weight = w
    accepted.dp_events += aggregate.dp_events
    return RoundRecord(rnd, statuses, aggregate.server_loss), accepted


def unreported_dp_rounds(records: list[RoundRecord], events: list[DPEvent], client_ids: list[int]) -> dict[int, str]:
    """Clients that may have spent privacy budget the ledger does not hold: a message reached them in a
    round, no usable reply came back (no reply by the end of the run, or one lost on the way), and no
    later report of theirs covers that round (a trained round appears as a DP event in every later
    report; a budget-spent reply says it trained nothing)."""
    out = {}
    for k in client_ids:
        covered = {e.round for e in events if e.client == k}
        covered |= {r.round - (r.clients[k].staleness or 0) for r in records
                    if k in r.clients and r.clients[k].status == BUDGET_SPENT}
        missing = sorted(r.round for r in records
                         if k in r.clients and r.clients[k].status in (NO_REPLY, LOST) and r.round not in covered)
        if missing:
            out[k] = (f"round(s) {missing}: a message reached the client but no usable reply came back, so what it "
                      "spent there is unknown")
    return out
