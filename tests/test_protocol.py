"""What crosses the federation boundary, in both directions, and what each strategy does with it."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import Federation, tiny_config
from federation.client import Client
from federation.messages import load_downlink, load_uplink
from federation.server import AlignFLServer


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Tiny in-process training runs faster with one torch thread on a busy machine."""


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

    def spy(self, upload, arrived):
        received.append(upload)
        return original(self, upload, arrived)

    monkeypatch.setattr(AlignFLServer, "accept", spy)
    fed = Federation(tiny_config(), tmp_path)
    record = fed.round(0)
    assert record.rejected == {}
    clients = [fed.client(k, 1) for k in range(3)]

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
        assert states_equal(up.tensors, snapshot(clients[up.client].vae.decoder))

    # nothing the server holds after the round equals any client encoder tensor
    held = [t for dec in fed.strategy.client_decoders().values() for t in dec.state_dict().values()]
    held += list(fed.strategy.global_vae.state_dict().values())
    assert not any(matches_any(t, encoder_values) for t in held)

    shared = tmp_path / "round-0"
    files = sorted(shared.glob("client-*.safetensors"))
    assert [f.name for f in files] == [f"client-{c.id}.safetensors" for c in clients]
    for f in files:
        meta = json.loads(f.with_suffix(".json").read_text())
        assert meta["kind"] == "decoder" and meta["extra_artifacts"] == [] and meta["direction"] == "uplink"
        with safe_open(str(f), framework="pt") as fh:
            keys = list(fh.keys())
            assert keys and all(k.startswith("decoder.") for k in keys)
            for k in keys:
                assert not matches_any(fh.get_tensor(k), encoder_values), (f.name, k)
    # what the server sent down: one instruction to all three clients, with no tensors at all
    down = load_downlink(shared / "server-to-clients.safetensors")
    assert down.recipients == (0, 1, 2) and down.payload.kind == "empty" and down.payload.tensors == {}
    assert sorted(p.name for p in shared.iterdir()) == sorted(
        [f"client-{c.id}.{e}" for c in clients for e in ("safetensors", "json")]
        + ["server-to-clients.safetensors", "server-to-clients.json"])


def test_alignfl_clients_keep_their_own_state_across_rounds(tmp_path, monkeypatch):
    calls: dict[int, list[tuple[dict, dict]]] = {}
    original = Client.train_round

    def spy(self, *args, **kwargs):
        before = snapshot(self.vae)
        out = original(self, *args, **kwargs)
        calls.setdefault(self.id, []).append((before, snapshot(self.vae)))
        return out

    monkeypatch.setattr(Client, "train_round", spy)
    fed = Federation(tiny_config(training={"rounds": 2}), tmp_path)
    for rnd in range(2):
        fed.round(rnd)

    server_decoder = snapshot(fed.strategy.global_vae.decoder)
    for k in range(3):
        (pre0, post0), (pre1, post1) = calls[k]
        assert not states_equal(pre0, post0)  # training changed the model
        assert states_equal(pre1, post0)  # round 1 starts from what the client trained in round 0
        client = fed.client(k, 2)
        assert states_equal(snapshot(client.vae), post1)  # and nothing overwrote it afterwards
        assert not states_equal({k2: v for k2, v in post1.items() if k2.startswith("decoder.")},
                                {f"decoder.{k2}": v for k2, v in server_decoder.items()})
        # the client's optimizer persists too (through its saved state): Adam counted every step of both rounds
        batches = -(-len(fed.setups[k].data) // fed.cfg.training.batch_size) * fed.cfg.training.local_epochs
        steps = {int(s["step"]) for s in client.optimizer.state.values()}
        assert steps == {2 * batches}
    # the round-1 uploads are the clients' round-1 decoders
    for k in range(3):
        with safe_open(str(tmp_path / "round-1" / f"client-{k}.safetensors"), framework="pt") as fh:
            for key in fh.keys():
                assert torch.equal(fh.get_tensor(key), calls[k][1][1][key])


# ------------------------------------------------------------------------------ FedAvg / FedProx
def test_fedavg_global_state_is_the_sample_weighted_mean_and_is_what_clients_receive(tmp_path, monkeypatch):
    starts: dict[int, dict] = {}
    original = Client.train_round

    def spy(self, *args, **kwargs):
        starts[self.id] = snapshot(self.vae)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Client, "train_round", spy)
    fed = Federation(tiny_config(strategy={"name": "fedavg"}, training={"rounds": 2}), tmp_path)
    assert fed.strategy.name == "fedavg"
    initial = snapshot(fed.strategy.global_vae)
    fed.round(0)
    shared = tmp_path / "round-0"
    # the downlink is the server's initial global model, sent to every client, and clients start from it
    down = load_downlink(shared / "server-to-clients.safetensors")
    assert down.recipients == (0, 1, 2) and down.payload.kind == "vae"
    assert states_equal(down.payload.tensors, initial)
    for k in range(3):
        assert states_equal(starts[k], initial)

    uploads = {}
    for k in range(3):
        up = load_uplink(shared / f"client-{k}.safetensors")
        assert up.kind == "vae"
        uploads[k] = (up.num_samples, up.tensors)
    counts = [n for n, _ in uploads.values()]
    assert counts == [s.num_samples for s in fed.setups] and len(set(counts)) > 1
    total = sum(counts)
    global_state = snapshot(fed.strategy.global_vae)  # a copy: round 1 updates the module in place
    assert set(global_state) == set(uploads[0][1])
    unweighted_gap = 0.0
    for key in global_state:
        stack = torch.stack([t[key].double() for _, t in uploads.values()])
        weights = torch.tensor([n / total for n, _ in uploads.values()], dtype=torch.float64)
        weighted = (stack * weights.view(-1, *[1] * (stack.dim() - 1))).sum(0)
        torch.testing.assert_close(global_state[key].double(), weighted, rtol=0, atol=1e-6)
        torch.testing.assert_close(fed.strategy.global_state[key].double(), weighted, rtol=0, atol=1e-6)
        unweighted_gap = max(unweighted_gap, float((stack.mean(0) - weighted).abs().max()))
    assert unweighted_gap > 1e-5  # the weighting matters, so the check above is not vacuous

    # round 1: the downlink is the averaged model, and every client starts from it
    fed.round(1)
    down1 = load_downlink(tmp_path / "round-1" / "server-to-clients.safetensors")
    assert states_equal(down1.payload.tensors, global_state)
    for k in range(3):
        assert states_equal(starts[k], global_state)


def _after_one_round(tmp_path, name: str, **own):
    fed = Federation(tiny_config(strategy={"name": name, **own}), tmp_path)
    ref = {k: v.clone() for k, v in fed.strategy.global_state.items()}
    fed.round(0)
    drift = [sum(float(((up.tensors[k].double() - ref[k].double()) ** 2).sum()) for k in ref)
             for _, (up, _) in sorted(fed.strategy.last_uploads.items())]
    return fed.strategy, {k: v.clone() for k, v in fed.strategy.global_state.items()}, drift


def test_fedprox_differs_from_fedavg(tmp_path):
    avg, avg_state, avg_drift = _after_one_round(tmp_path / "avg", "fedavg")
    again, again_state, _ = _after_one_round(tmp_path / "again", "fedavg")
    prox, prox_state, prox_drift = _after_one_round(tmp_path / "prox", "fedprox", mu=5.0)
    assert (avg.name, prox.name) == ("fedavg", "fedprox")
    assert states_equal(avg_state, again_state)  # same seed, same result: the difference below is mu's
    assert not states_equal(avg_state, prox_state)
    # the proximal term keeps every client closer to the global model it started from
    assert all(p < a for p, a in zip(prox_drift, avg_drift)), (prox_drift, avg_drift)
