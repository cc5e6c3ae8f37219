"""The Flower engine.

- Against a scripted grid (no Flower runtime): first contact pins nodes to client ids and refuses a
  second claim or too few nodes; a round's deadline turns a slow reply into a late one, used in a later
  round; a reply that names another client is refused.
- On Flower's simulation runtime, and on a real SuperLink with two SuperNodes started as processes on
  127.0.0.1: the same seed and thread count give the same shared files, ledger, rounds and metrics as
  the in-process engine; a node that claims another client's id stops the run with one line.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from flwr.app import ConfigRecord, Message, Metadata, RecordDict

from alignfl_audit.cli import main
from alignfl_audit.flower_launch import _flower_bin
from conftest import tiny_config
from federation.engines.flower import FlowerEngine
from federation.engines.flower_settings import FlowerSettings
from federation.engines.flower_wire import HELLO, INFO, pack, unpack
from federation.errors import FederationError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def in_a_serverapp(monkeypatch):
    """Messages are built inside a ServerApp, where Flower knows the run and node ids."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


# ------------------------------------------------------------------ a scripted grid
class ScriptedGrid:
    """Answers messages as the script says: ``claims[node]`` is the client a node says it holds;
    ``delay[(node, round)]`` holds a train reply back for that many pulls; ``liar[node]`` makes a node
    answer train messages as another client."""

    def __init__(self, claims: dict[int, int], delay=None, liar=None):
        self.claims, self.delay, self.liar = claims, delay or {}, liar or {}
        self.inbox: dict[str, list] = {}  # message id -> [pulls left, reply]
        self.count = 0

    def get_node_ids(self):
        return list(self.claims)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            self.count += 1
            mid = f"m{self.count}"
            node = m.metadata.dst_node_id
            if m.metadata.message_type == HELLO:
                content, wait = RecordDict({INFO: ConfigRecord({"client": self.claims[node]})}), 0
            else:
                blob, meta, rnd, client = unpack(m.content, "test")
                content = pack(b"reply:" + blob, meta, rnd, self.liar.get(node, client))
                wait = self.delay.get((node, rnd), 0)
            reply = Message(content, dst_node_id=0, message_type=m.metadata.message_type)
            reply.metadata.__dict__["_src_node_id"] = node
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            self.inbox[mid] = [wait, reply]
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in ids:
            if mid in self.inbox:
                if self.inbox[mid][0] <= 0:
                    out.append(self.inbox.pop(mid)[1])
                else:
                    self.inbox[mid][0] -= 1
        return out


def _engine(grid, clients=(0, 1), **settings) -> FlowerEngine:
    s = FlowerSettings(**{"round_timeout": 5.0, "connect_timeout": 1.0, **settings})
    return FlowerEngine(grid, s, list(clients), {"config": "", "threads": 1, "data-root": "", "shards": ""})


@pytest.mark.usefixtures("in_a_serverapp")
def test_the_scripted_grid_builds_real_flower_messages():
    reply = Message(RecordDict(), dst_node_id=0, message_type="train")
    reply.metadata.__dict__["_src_node_id"] = 7
    assert isinstance(reply.metadata, Metadata) and reply.metadata.src_node_id == 7


@pytest.mark.usefixtures("in_a_serverapp")
def test_first_contact_pins_each_node_to_the_client_it_holds():
    engine = _engine(ScriptedGrid({101: 1, 102: 0}))
    engine.start()
    assert engine.nodes == {1: 101, 0: 102}


@pytest.mark.usefixtures("in_a_serverapp")
def test_a_second_node_claiming_a_pinned_client_is_refused_in_one_line():
    with pytest.raises(FederationError, match="claims client 0, which node 101 already holds") as err:
        _engine(ScriptedGrid({101: 0, 102: 0})).start()
    assert "\n" not in str(err.value)


@pytest.mark.usefixtures("in_a_serverapp")
def test_a_claim_outside_the_federation_is_refused():
    with pytest.raises(FederationError, match="claims client 5, which is not in this federation"):
        _engine(ScriptedGrid({101: 0, 102: 5})).start()


@pytest.mark.usefixtures("in_a_serverapp")
def test_fewer_nodes_than_clients_when_the_deadline_passes_is_one_line():
    t0 = time.monotonic()
    with pytest.raises(FederationError, match=r"only 1 of 2 client nodes joined within 1 s .*client\(s\) \[1\]"):
        _engine(ScriptedGrid({101: 0})).start()
    assert time.monotonic() - t0 < 5


@pytest.mark.usefixtures("in_a_serverapp")
def test_a_reply_past_the_deadline_arrives_in_a_later_round_and_its_client_is_busy_meanwhile():
    grid = ScriptedGrid({101: 0, 102: 1}, delay={(102, 0): 10**9})
    engine = _engine(grid, round_timeout=0.5)
    engine.start()
    out = engine.exchange(0, {0: (b"a", {"x": 1}), 1: (b"b", {"x": 2})})
    assert [(a.client, a.sent_round, a.blob) for a in out.arrivals] == [(0, 0, b"reply:a")]
    assert out.no_reply == [1] and engine.busy() == {1}
    next(v for v in grid.inbox.values())[0] = 0  # the straggler's reply now arrives
    out = engine.exchange(1, {0: (b"c", {})})
    assert sorted((a.client, a.sent_round) for a in out.arrivals) == [(0, 1), (1, 0)]
    assert engine.busy() == set()


@pytest.mark.usefixtures("in_a_serverapp")
def test_a_pinned_node_that_answers_as_another_client_is_refused():
    engine = _engine(ScriptedGrid({101: 0, 102: 1}, liar={102: 0}))
    engine.start()
    out = engine.exchange(0, {0: (b"a", {}), 1: (b"b", {})})
    assert [a.client for a in out.arrivals] == [0]
    assert "pinned to client 1, answered as client 0" in out.lost[1] and 1 not in out.failed


# ------------------------------------------------------------------ real Flower processes
DP = {"mechanism": "dp-sgd", "target_epsilon": 4.0, "delta": 1e-5}
SMALL = tiny_config(
    name="flower-same",
    partition={"client_classes": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], "samples_per_class": 30,
               "holdout_per_class": 10},
    model={"hidden": [32, 16]},
    training={"rounds": 2, "batch_size": 32},
    server={"samples_per_client": 40},
    metrics={"fid_samples": 100, "probe_every_round": False},
    privacy=DP, audit=False, report=False,
)


def _run(tmp_path: Path, name: str, *sets: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / name
    args = ["run", str(path), "--out", str(out), "--quiet"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    return out


def _same_run(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in (a / "shared").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in (b / "shared").rglob("*") if p.is_file())
    assert files_a == files_b and files_a
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "privacy_ledger.json").read_bytes() == (b / "privacy_ledger.json").read_bytes()
    assert (a / "rounds.csv").read_bytes() == (b / "rounds.csv").read_bytes()
    ma, mb = (json.loads((x / "metrics.json").read_text()) for x in (a, b))
    assert ma["utility"] == mb["utility"] and ma["privacy"] == mb["privacy"]
    assert mb["engine"]["name"] == "flower"


@pytest.fixture(scope="module")
def inprocess_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("inprocess"), "run")


def test_flower_simulation_gives_the_in_process_result(inprocess_run, tmp_path):
    flower = _run(tmp_path, "run", "engine.name=flower")
    _same_run(inprocess_run, flower)


def _free_port() -> int:
    from alignfl_audit.flower_launch import _free_port as free

    return free()


class Deployment:
    """A real SuperLink and SuperNodes, as processes on 127.0.0.1, with a private FLWR_HOME."""

    def __init__(self, home: Path):
        self.home, self.procs = home, []
        self.port = _free_port()
        from alignfl_audit.flower_launch import _env

        self.env = {**_env(home), "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "FLWR_DISABLE_UPDATE_CHECK": "1"}
        self._start([_flower_bin("flower-superlink"), "--insecure", "--isolation", "subprocess", "--host", "127.0.0.1",
                     "--port", str(self.port), "--disable-runtime-dependency-installation"], "superlink")

    def _start(self, cmd, name):
        log = (self.home / f"{name}.log").open("ab")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def supernode(self, partition: int, name: str):
        self._start([_flower_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                     "--port", str(_free_port()), "--node-config", f"partition-id={partition}"], name)

    def close(self):
        from alignfl_audit.flower_launch import stop

        for p in reversed(self.procs):
            stop(p)


@pytest.fixture
def deployment(tmp_path):
    (tmp_path / "flwr").mkdir()
    d = Deployment(tmp_path / "flwr")
    yield d
    d.close()


def test_a_real_superlink_and_two_supernodes_give_the_in_process_result(inprocess_run, deployment, tmp_path):
    """Each message starts a fresh ClientApp process: the client's VAE, Adam moments, clip bound and
    DP events survive between rounds only through Context.state."""
    deployment.supernode(0, "node0")
    deployment.supernode(1, "node1")
    flower = _run(tmp_path, "run", "engine.name=flower", "engine.mode=deployment",
                  f"engine.superlink=127.0.0.1:{deployment.port}")
    _same_run(inprocess_run, flower)


def test_a_node_claiming_another_clients_id_stops_the_run_in_one_line(deployment, tmp_path, capsys):
    deployment.supernode(0, "honest")
    deployment.supernode(0, "liar")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "training": {**SMALL["training"], "rounds": 1}}))
    code = main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet", "--set", "engine.name=flower",
                 "--set", "engine.mode=deployment", "--set", f"engine.superlink=127.0.0.1:{deployment.port}",
                 "--set", "engine.connect_timeout=120"])
    err = capsys.readouterr().err
    assert code == 2
    assert "claims client 0, which node" in err and "already holds" in err and err.count("\n") == 1
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and not (tmp_path / "run" / "metrics.json").exists()


def test_an_unreachable_superlink_is_one_line_and_leaves_no_run(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    code = main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet", "--set", "engine.name=flower",
                 "--set", "engine.mode=deployment", "--set", f"engine.superlink=127.0.0.1:{_free_port()}",
                 "--set", "engine.connect_timeout=1"])
    err = capsys.readouterr().err
    assert code == 2 and "could not be reached within 1 s" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
