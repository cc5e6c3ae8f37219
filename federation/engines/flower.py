"""The Flower engine: carries a strategy's encoded messages over Flower's Message API (a ``Grid`` in a
ServerApp), on Flower's simulation runtime or on a real SuperLink with one SuperNode per client.

- **First contact pins nodes.** ``start`` sends every node a hello; each answers with the client id it
  holds (its ``partition-id``). The server pins node to client for the whole run. A second node that
  claims a pinned id, an id outside the federation, or too few nodes when ``connect_timeout`` passes
  stop the run with one line.
- **Rounds have a deadline.** ``exchange`` pushes the round's downlinks and pulls replies until every
  recipient has answered or ``round_timeout`` passes. A reply that arrives later is returned in a
  later round (its staleness is recorded by the round loop); until then its client is busy.
- A reply must come from the node pinned to the client it answers for, name that client, and pass
  its sha256 check; otherwise its reply is recorded as lost (the client may have trained: unless a later
  report covers that round, its DP spend is unknown and no epsilon is reported for it).
"""
from __future__ import annotations

import time

from flwr.app import ConfigRecord, Message, RecordDict

from federation.engines.base import Arrival, Engine, Exchange
from federation.engines.flower_settings import FlowerSettings
from federation.engines.flower_wire import HELLO, INFO, TRAIN, info, pack, unpack
from federation.errors import FederationError, UploadRejected

POLL_SECONDS = 0.2


class FlowerEngine(Engine):
    name = "flower"

    def __init__(self, grid, settings: FlowerSettings, client_ids: list[int], hello: dict):
        self.grid, self.settings, self.client_ids, self.hello = grid, settings, list(client_ids), hello
        self.nodes: dict[int, int] = {}  # client -> pinned node
        self.outstanding: dict[str, tuple[int, int]] = {}  # message id -> (client, round sent)
        self.joined: dict[int, dict] = {}  # client -> what its node said on first contact

    # ------------------------------------------------------------------ first contact
    def start(self) -> None:
        deadline = time.monotonic() + self.settings.connect_timeout
        asked: set[int] = set()
        pending: dict[str, int] = {}  # hello message id -> node
        while len(self.nodes) < len(self.client_ids):
            new = [n for n in self.grid.get_node_ids() if n not in asked]
            if new:
                msgs = [Message(RecordDict({INFO: ConfigRecord(dict(self.hello))}), dst_node_id=n, message_type=HELLO,
                                group_id="hello") for n in new]
                pending.update(zip(self.grid.push_messages(msgs), new))
                asked.update(new)
            if pending:
                for reply in self.grid.pull_messages(list(pending)):
                    node = pending.pop(reply.metadata.reply_to_message_id)
                    self._pin(node, reply)
            if len(self.nodes) == len(self.client_ids):
                break
            if time.monotonic() > deadline:
                missing = sorted(set(self.client_ids) - set(self.nodes))
                raise FederationError(f"only {len(self.nodes)} of {len(self.client_ids)} client nodes joined within "
                                      f"{self.settings.connect_timeout:g} s (engine.connect_timeout); no node holds "
                                      f"client(s) {missing}")
            time.sleep(POLL_SECONDS)

    def _pin(self, node: int, reply: Message) -> None:
        if reply.has_error():
            raise FederationError(f"node {node} could not join the federation: {_one_line(reply.error.reason)}")
        said = info(reply.content)
        if "failure" in said:
            raise FederationError(f"node {node} could not join the federation: {_one_line(said['failure'])}")
        claimed = said.get("client")
        if not isinstance(claimed, int) or isinstance(claimed, bool):
            raise FederationError(f"node {node} answered the first contact without a client id")
        if claimed not in self.client_ids:
            raise FederationError(f"node {node} claims client {claimed}, which is not in this federation "
                                  f"(clients {self.client_ids})")
        if claimed in self.nodes:
            raise FederationError(f"node {node} claims client {claimed}, which node {self.nodes[claimed]} already "
                                  "holds; a node may not claim another client's id")
        self.nodes[claimed] = node
        self.joined[claimed] = said

    def client_facts(self) -> dict[int, dict]:
        return {k: {"noise": str(said.get("noise", "not reported"))} for k, said in self.joined.items()}

    # ------------------------------------------------------------------ rounds
    def busy(self) -> set[int]:
        return {k for k, _ in self.outstanding.values()}

    def exchange(self, rnd: int, downlinks: dict[int, tuple[bytes, dict]]) -> Exchange:
        msgs, sent = [], []
        for k in sorted(downlinks):
            blob, meta = downlinks[k]
            msgs.append(Message(pack(blob, meta, rnd, k), dst_node_id=self.nodes[k], message_type=TRAIN,
                                group_id=str(rnd)))
            sent.append(k)
        if msgs:
            self.outstanding.update({mid: (k, rnd) for mid, k in zip(self.grid.push_messages(msgs), sent)})
        out = Exchange()
        deadline = time.monotonic() + self.settings.round_timeout
        while True:
            self._collect(out)
            if not any(r == rnd for _, r in self.outstanding.values()) or time.monotonic() > deadline:
                break
            time.sleep(POLL_SECONDS)
        out.no_reply = sorted(k for k, r in self.outstanding.values() if r == rnd)
        return out

    def _collect(self, out: Exchange) -> None:
        if not self.outstanding:
            return
        for reply in self.grid.pull_messages(list(self.outstanding)):
            k, sent_round = self.outstanding.pop(reply.metadata.reply_to_message_id)
            node = reply.metadata.src_node_id
            if node != self.nodes[k]:
                out.lost[k] = f"a reply for client {k} came from node {node}, not from its pinned node {self.nodes[k]}"
                continue
            if reply.has_error():
                out.lost[k] = f"client {k}'s node answered with an error: {_one_line(reply.error.reason)}"
                continue
            try:
                said = info(reply.content)
                if "failure" in said:  # the client refused the message before training
                    out.failed[k] = _one_line(str(said["failure"]))
                    continue
                blob, meta, rnd, claimed = unpack(reply.content, f"reply of client {k}")
            except UploadRejected as err:
                out.lost[k] = str(err)
                continue
            if claimed != k or rnd != sent_round:
                out.lost[k] = (f"node {node}, pinned to client {k}, answered as client {claimed} for round {rnd}; "
                               "a node may not claim another client's id")
                continue
            out.arrivals.append(Arrival(k, sent_round, blob, meta))

    def drain(self, last_round: int) -> list[Arrival]:
        out = Exchange()
        deadline = time.monotonic() + self.settings.round_timeout
        while self.outstanding and time.monotonic() <= deadline:
            self._collect(out)
            time.sleep(POLL_SECONDS)
        return out.arrivals


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no reason given"
