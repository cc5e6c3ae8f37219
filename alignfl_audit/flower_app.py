"""The Flower apps: a ServerApp that runs the federation's server loop on a ``FlowerEngine``, and a
ClientApp that is one client, on Flower's simulation runtime or on a SuperNode of a real federation.

The ServerApp reads its run directory from the run config (``run-dir``), which the launcher
(``alignfl_audit.flower_launch``) has made and headed with the resolved config; it writes the run
directory exactly as an in-process run does.

The ClientApp holds one client: the one its node's ``partition-id`` names. It loads its own data
(the node's ``data-root``, else the run's), builds its own setup, and keeps its state between messages
in ``Context.state`` as safetensors bytes (``federation.state_codec``), because each message may start a
fresh ClientApp process. Its data and state never leave the node; only the strategy's encoded reply does.
"""
from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from federation.client import ClientSetup
from federation.engines.base import ClientFailure, handle_encoded
from federation.engines.flower_wire import INFO, info, pack, unpack
from federation.errors import FederationError
from federation.state_codec import state_from_bytes, state_to_bytes

STATE_KEY = "alignfl-client-state"
JOIN_KEY = "alignfl-join"


# ---------------------------------------------------------------------------------------- server
server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from alignfl_audit.config import dump_config
    from alignfl_audit.orchestrate import prepare, read_run_config, train_and_evaluate
    from alignfl_audit.rundir import RunDir
    from federation.engines.flower import FlowerEngine

    started = time.perf_counter()
    rc = context.run_config
    run = RunDir(str(rc["run-dir"]))
    try:
        torch.set_num_threads(int(rc["threads"]))
        cfg = read_run_config(run)
        data, partition, setups = prepare(cfg, str(rc.get("data-root", "")) or None)
        # a strategy without federation (the centralized reference) trains in the ServerApp and messages no node
        client_ids = list(range(len(partition.shards))) if cfg.strategy_class.federated() else []
        hello = {"config": dump_config(cfg), "threads": int(rc["threads"]), "data-root": str(rc.get("data-root", "")),
                 "shards": _shard_digests(partition)}
        engine = FlowerEngine(grid, cfg.engine, client_ids, hello)
        train_and_evaluate(cfg, data, partition, setups, run, engine, True, started)
    except BaseException as err:
        run.set_status("failed", error=str(err) if isinstance(err, FederationError) else f"{type(err).__name__}: {err}")
        raise


def _shard_digests(partition) -> str:
    """sha256 of each client's record ids, so that a node whose data give another partition is refused."""
    return yaml.safe_dump([_shard_digest(s) for s in partition.shards])


def _shard_digest(shard) -> str:
    ids = np.concatenate([shard.train_ids, shard.outlier_ids, shard.canary_ids]).astype(np.int64)
    return hashlib.sha256(ids.tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------- client
client_app = ClientApp()
_SETUPS: dict[tuple, tuple] = {}  # a simulation worker keeps its clients' setups between messages


def _partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ClientFailure("this node has no partition-id in its node config (--node-config partition-id=K)")
    return int(context.node_config["partition-id"])


def _setup(join: dict, client: int, context: Context) -> tuple[ClientSetup, object]:
    from alignfl_audit.config import from_dict
    from alignfl_audit.orchestrate import client_setups, load_data
    from federation.data.partition import make_partition

    root = str(context.node_config.get("data-root", "")) or join["data-root"] or None
    key = (hashlib.sha256(join["config"].encode()).hexdigest(), client, root)
    if key not in _SETUPS:
        cfg = from_dict(yaml.safe_load(join["config"]))
        data = load_data(cfg, root)
        partition = make_partition(cfg.partition, data.train.labels,
                                   data.outlier_train.labels if data.outlier_train is not None else np.zeros(0),
                                   cfg.data.dataset, cfg.outlier_dataset, cfg.seed)
        expected = yaml.safe_load(join["shards"])
        if client >= len(partition.shards) or _shard_digest(partition.shards[client]) != expected[client]:
            raise ClientFailure(f"client {client}'s data on this node do not give the server's partition; "
                                "give the node the run's dataset with --node-config data-root=DIR")
        setup = client_setups(cfg, data, partition, only=client)[0]
        secret = str(context.node_config.get("noise-secret", ""))
        if secret:  # the node's own randomness: the server and anyone who knows the run's seed cannot recompute it
            setup.noise_secret = int.from_bytes(hashlib.sha256(secret.encode()).digest()[:8], "little")
        _SETUPS.clear()  # one client per node: keep only the current run's setup
        _SETUPS[key] = (setup, cfg.strategy_class.client_handler(cfg.strategy, cfg.server))
    return _SETUPS[key]


@client_app.query()
def _hello(msg: Message, context: Context) -> Message:
    try:
        join = {k: v for k, v in info(msg.content).items()}
        client = _partition_id(context)
        setup, _ = _setup(join, client, context)
        context.state[JOIN_KEY] = ConfigRecord(join)
        said = {"client": client, "num_samples": setup.num_samples, "noise": setup.noise_source}
    except (ClientFailure, FederationError) as err:
        said = {"failure": str(err)}
    return Message(RecordDict({INFO: ConfigRecord(said)}), reply_to=msg)


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    try:
        client = _partition_id(context)
        if JOIN_KEY not in context.state.config_records:
            raise ClientFailure(f"client {client} was sent a round before it joined the federation")
        join = dict(context.state.config_records[JOIN_KEY])
        torch.set_num_threads(int(join["threads"]))
        blob, meta, rnd, addressed = unpack(msg.content, f"downlink to client {client}")
        if addressed != client:
            raise ClientFailure(f"this node holds client {client} but was sent client {addressed}'s message")
        setup, handler = _setup(join, client, context)
        saved = context.state.array_records.get(STATE_KEY)
        state = state_from_bytes(saved["bytes"].numpy().tobytes()) if saved is not None else None
        rblob, rmeta, new_state = handle_encoded(setup, handler, state, blob, meta)
        context.state[STATE_KEY] = ArrayRecord({"bytes": Array(np.frombuffer(state_to_bytes(new_state),
                                                                             dtype=np.uint8))})
        return Message(pack(rblob, rmeta, rnd, client), reply_to=msg)
    except (ClientFailure, FederationError) as err:
        return Message(RecordDict({INFO: ConfigRecord({"failure": str(err)})}), reply_to=msg)
