"""What crosses the federation boundary, and what each strategy does with it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from alignfl_audit.config import from_dict
from alignfl_audit.orchestrate import build_strategy, client_tensors, load_data
from conftest import tiny_config
from federation.client import Client
from federation.data.partition import make_partition
from federation.server import AlignFLServer


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Tiny in-process training runs faster with one torch thread on a busy machine."""


def build(cfg_dict: dict):
    """Clients and strategy exactly as the orchestrator builds them, without a run directory."""
    cfg = from_dict(cfg_dict)
    data = load_data(cfg)
    olabels = data.outlier_train.labels if data.outlier_train is not None else np.zeros(0)
    part = make_partition(cfg.partition, data.train.labels, olabels, cfg.data.dataset, cfg.outlier_dataset,
                          cfg.seed)
    torch.manual_seed(cfg.seed)
    clients = [Client(i, spec, x, cfg.training, cfg.seed)
               for i, (spec, x) in enumerate(zip(cfg.client_specs(), client_tensors(data, part)))]
    return cfg, clients, build_strategy(cfg, clients)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def states_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def matches_any(t: torch.Tensor, pool: list[torch.Tensor]) -> bool:
    return any(t.shape == p.shape and torch.equal(t, p) for p in pool)


# --------------------------------------------------------------------------------------- ALIGN-FL
def test_no_encoder_tensor_reaches_the_alignfl_server(tmp_path, monkeypatch):
    received = []
    original = AlignFLServer.accept

    def spy(self, upload):
        received.append(upload)
        return original(self, upload)

    monkeypatch.setattr(AlignFLServer, "accept", spy)
    cfg, clients, strategy = build(tiny_config())
    shared = tmp_path / "run" / "shared" / "round-0"
    record = strategy.run_round(0, shared)
    assert record["rejected"] == {}

    encoders = {c.id: snapshot(c.vae.encoder) for c in clients}
    encoder_values = [t for enc in encoders.values() for t in enc.values()]
    encoder_names = {n for enc in encoders.values() for n in enc} | \
                    {f"encoder.{n}" for enc in encoders.values() for n in enc}
    assert encoder_values and encoder_names

    assert sorted(u.client for u in received) == [c.id for c in clients]
    for up in received:
        assert up.kind == "decoder" and up.extras == {}
        assert not set(up.tensors) & encoder_names
        assert not any("encoder" in name for name in up.tensors)
        for name, t in up.tensors.items():
            assert not matches_any(t, encoder_values), (up.client, name)
        # positive control: the comparison does recognise a client's own tensors
        own = snapshot(clients[up.client].vae.decoder)
        assert states_equal(up.tensors, own)

    # nothing the server holds after the round equals any client encoder tensor
    held = [t for dec in strategy.client_decoders().values() for t in dec.state_dict().values()]
    held += list(strategy.global_vae.state_dict().values())
    assert not any(matches_any(t, encoder_values) for t in held)

    files = sorted(shared.glob("*.safetensors"))
    assert [f.name for f in files] == [f"client-{c.id}.safetensors" for c in clients]
    for f in files:
        meta = json.loads(f.with_suffix(".json").read_text())
        assert meta["kind"] == "decoder" and meta["extra_artifacts"] == []
        with safe_open(str(f), framework="pt") as fh:
            keys = list(fh.keys())
            assert keys and all(k.startswith("decoder.") for k in keys)
            assert not any("encoder" in k for k in keys)
            for k in keys:
                assert not matches_any(fh.get_tensor(k), encoder_values), (f.name, k)
    assert sorted(p.name for p in shared.iterdir()) == sorted(
        [f"client-{c.id}.safetensors" for c in clients] + [f"client-{c.id}.json" for c in clients])


def test_alignfl_clients_keep_their_own_state_across_rounds(tmp_path, monkeypatch):
    calls: dict[int, list[tuple[dict, dict]]] = {}
    original = Client.train_round

    def spy(self, *args, **kwargs):
        before = snapshot(self.vae)
        out = original(self, *args, **kwargs)
        calls.setdefault(self.id, []).append((before, snapshot(self.vae)))
        return out

    monkeypatch.setattr(Client, "train_round", spy)
    cfg, clients, strategy = build(tiny_config(training={"rounds": 2}))
    optimizers = [id(c.optimizer) for c in clients]
    for rnd in range(2):
        strategy.run_round(rnd, tmp_path / "shared" / f"round-{rnd}")

    server_decoder = snapshot(strategy.global_vae.decoder)
    for c in clients:
        (pre0, post0), (pre1, post1) = calls[c.id]
        assert not states_equal(pre0, post0)  # training changed the model
        assert states_equal(pre1, post0)  # round 1 starts from what the client trained in round 0
        assert states_equal(snapshot(c.vae), post1)  # and nothing overwrote it afterwards
        assert not states_equal({k: v for k, v in post1.items() if k.startswith("decoder.")},
                                {f"decoder.{k}": v for k, v in server_decoder.items()})
        # the client's optimizer persists too: Adam counted every step of both rounds
        assert id(c.optimizer) == optimizers[c.id]
        batches = -(-len(c.data) // cfg.training.batch_size) * cfg.training.local_epochs
        steps = {int(s["step"]) for s in c.optimizer.state.values()}
        assert steps == {2 * batches}
    # the round-1 uploads are the clients' round-1 decoders
    for c in clients:
        with safe_open(str(tmp_path / "shared" / "round-1" / f"client-{c.id}.safetensors"), framework="pt") as fh:
            for k in fh.keys():
                assert torch.equal(fh.get_tensor(k), calls[c.id][1][1][k])


# ------------------------------------------------------------------------------ FedAvg / FedProx
def test_fedavg_global_state_is_the_sample_weighted_mean(tmp_path, monkeypatch):
    starts: dict[int, dict] = {}
    original = Client.train_round

    def spy(self, *args, **kwargs):
        starts[self.id] = snapshot(self.vae)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Client, "train_round", spy)
    cfg, clients, strategy = build(tiny_config(strategy={"name": "fedavg"}, training={"rounds": 2}))
    assert strategy.name == "fedavg"
    shared = tmp_path / "shared" / "round-0"
    strategy.run_round(0, shared)

    uploads = {}
    for c in clients:
        meta = json.loads((shared / f"client-{c.id}.json").read_text())
        assert meta["kind"] == "vae"
        with safe_open(str(shared / f"client-{c.id}.safetensors"), framework="pt") as fh:
            uploads[c.id] = (meta["num_samples"], {k[len("vae."):]: fh.get_tensor(k) for k in fh.keys()})
    counts = [n for n, _ in uploads.values()]
    assert counts == [len(c.data) for c in clients] and len(set(counts)) > 1
    total = sum(counts)
    global_state = snapshot(strategy.global_vae)  # a copy: round 1 updates the module in place
    assert set(global_state) == set(uploads[0][1])
    unweighted_gap = 0.0
    for key in global_state:
        stack = torch.stack([t[key].double() for _, t in uploads.values()])
        weights = torch.tensor([n / total for n, _ in uploads.values()], dtype=torch.float64)
        weighted = (stack * weights.view(-1, *[1] * (stack.dim() - 1))).sum(0)
        torch.testing.assert_close(global_state[key].double(), weighted, rtol=0, atol=1e-6)
        torch.testing.assert_close(strategy.global_state[key].double(), weighted, rtol=0, atol=1e-6)
        unweighted_gap = max(unweighted_gap, float((stack.mean(0) - weighted).abs().max()))
    assert unweighted_gap > 1e-5  # the weighting matters, so the check above is not vacuous

    # round 1: every client starts from the averaged model
    strategy.run_round(1, tmp_path / "shared" / "round-1")
    for c in clients:
        assert states_equal(starts[c.id], {k: v.to(starts[c.id][k].dtype) for k, v in global_state.items()})


def _global_after_one_round(tmp_path, name: str, mu: float = 0.0):
    cfg, clients, strategy = build(tiny_config(strategy={"name": name, "mu": mu}))
    ref = {k: v.clone() for k, v in strategy.global_state.items()}
    strategy.run_round(0, tmp_path / f"{name}-{mu}" / "round-0")
    drift = [sum(float(((u.tensors[k].double() - ref[k].double()) ** 2).sum()) for k in ref)
             for _, u in sorted(strategy.last_uploads.items())]
    return strategy, {k: v.clone() for k, v in strategy.global_state.items()}, drift


def test_fedprox_differs_from_fedavg(tmp_path):
    avg, avg_state, avg_drift = _global_after_one_round(tmp_path, "fedavg")
    again, again_state, _ = _global_after_one_round(tmp_path / "again", "fedavg")
    prox, prox_state, prox_drift = _global_after_one_round(tmp_path, "fedprox", mu=5.0)
    assert (avg.name, prox.name) == ("fedavg", "fedprox")
    assert states_equal(avg_state, again_state)  # same seed, same result: the difference below is mu's
    assert not states_equal(avg_state, prox_state)
    # the proximal term keeps every client closer to the global model it started from
    assert all(p < a for p, a in zip(prox_drift, avg_drift)), (prox_drift, avg_drift)
