"""FedHypeVAE under the strategy contract: what it sends and receives, what never leaves a client, its DP
accounting, resume, both engines, and its bad-input errors. Every run here is tiny: two clients, two rounds,
one local epoch. The Flower engine runs with the bundled ServerApp and ClientApp and Flower's transport
replaced by direct calls (``LoopbackGrid``); a real SuperLink is exercised by tests/test_flower.py, and its
transport does not depend on the strategy."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from alignfl_audit.cli import main
from alignfl_audit.config import from_dict
from conftest import Federation, tiny_config
from test_flower import in_a_serverapp  # noqa: F401 (a fixture: Flower messages are built inside a ServerApp)
from federation.engines import inprocess
from federation.engines.base import Arrival, Engine, Exchange
from federation.errors import ConfigError, UploadRejected
from federation.hyper_client import HyperCVAE
from federation.hypernetwork import UPDATE_KIND, FiLMHypernetwork, code_anchor, onehot
from federation.messages import ClientReport, Payload, Uplink, encode, load_downlink, load_uplink
from federation.privacy.bookkeeping import LinearBookkeeper
from federation.privacy.dp_hyper import HyperDPStep
from federation.privacy.dp_sgd import make_plan
from federation.privacy.spec import PrivacySpec
from federation.rng import seeded_generator
from federation.rounds import REJECTED, REPLIED, run_round
from federation.strategies import STRATEGIES
from federation.strategies.fedhypevae import FedHypeVAE, hyper_spec
from federation.state_codec import state_to_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DP = {"mechanism": "dp-sgd", "noise_multiplier": 3.0, "delta": 1e-5, "clipping": "adaptive"}
HV = tiny_config(
    name="hv",
    partition={"client_classes": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], "samples_per_class": 30, "holdout_per_class": 10,
               "outliers": {"count": 4, "client": 0, "holdout": 4}},
    model={"hidden": [32, 16]},
    strategy={"name": "fedhypevae", "code_dim": 4, "hyper_hidden": 16, "mmd_frequencies": 16, "mmd_samples": 16},
    training={"rounds": 2, "batch_size": 32},
    server={"samples_per_class": 20, "epochs": 1},
    metrics={"fid_samples": 100, "probe_every_round": False},
    privacy=DP, audit=False, report=False,
)


def _windows(t: torch.Tensor, n: int) -> torch.Tensor:
    flat = t.detach().flatten().float()
    return flat.unfold(0, n, 1) if len(flat) >= n else flat.new_zeros(0, n)


def contains_run(t: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether ``values`` stands in ``t`` (flattened) as a contiguous run, exactly."""
    return bool((_windows(t, len(values)) == values.float()).all(1).any())


# ------------------------------------------------------------------------------------ one DP round
@pytest.fixture(scope="module")
def one_round(tmp_path_factory):
    """Round 0 of a DP federation, with a spy on the transport: every encoded reply a client hands to the
    engine (the bytes that leave it) and the state it keeps."""
    root = tmp_path_factory.mktemp("hv-round")
    sent = []
    original = inprocess.handle_encoded

    def spy(setup, handler, state, blob, meta):
        out = original(setup, handler, state, blob, meta)
        sent.append((setup.client, out[0], out[1], out[2]))
        return out

    inprocess.handle_encoded = spy
    try:
        fed = Federation(HV, root)
        record = fed.round(0)
    finally:
        inprocess.handle_encoded = original
    return fed, record, sent, root / "round-0"


def test_fedhypevae_is_registered_with_its_own_sections():
    cfg = from_dict(HV)
    assert STRATEGIES["fedhypevae"] is FedHypeVAE and cfg.strategy.code_dim == 4
    for data, key in ((tiny_config(strategy={"name": "fedhypevae"}, server={"sampling": "prior"}), "server.sampling"),
                      (tiny_config(strategy={"name": "fedhypevae", "mu": 0.1}), "strategy.mu"),
                      (tiny_config(strategy={"name": "alignfl", "code_dim": 4}), "strategy.code_dim")):
        with pytest.raises(ConfigError, match=f"{key} does not apply to the"):
            from_dict(data)
    # the hypernetwork's trainers run in float32 only: a bf16 request is refused, not ignored
    with pytest.raises(ConfigError, match="training.precision bf16 is implemented for the .* not fedhypevae"):
        from_dict(_merge_training(HV, precision="bf16"))


def _merge_training(cfg: dict, **training) -> dict:
    return {**cfg, "training": {**cfg.get("training", {}), **training}}


def test_the_server_sends_its_hypernetwork_and_adds_the_weighted_mean_update():
    from alignfl_audit.orchestrate import build_strategy

    strategy = build_strategy(from_dict(HV))
    before = {k: v.clone() for k, v in strategy.hyper.state_dict().items()}
    plan = strategy.configure_round(0, [0, 1])
    down = plan[0]
    assert plan[1] is down and down.recipients == (0, 1) and down.payload.kind == "hypernetwork"
    assert down.payload.spec == strategy.spec and down.payload.extras == {}
    assert all(torch.equal(down.payload.tensors[k], before[k]) for k in before)
    deltas = {c: {k: torch.full_like(v, float(c + 1)) for k, v in before.items()} for c in (0, 1)}
    replies = [Uplink(c, 0, Payload(UPDATE_KIND, dict(strategy.spec), deltas[c]), n) for c, n in ((0, 100), (1, 300))]
    result = strategy.aggregate_round(0, replies)
    assert result.used == {0: 1.0, 1: 1.0} and result.server_loss is not None
    for k, v in strategy.hyper.state_dict().items():  # (100 * 1 + 300 * 2) / 400 = 1.75
        assert torch.allclose(v, before[k] + 1.75), k
    x, y = strategy.last_synthetic
    assert sorted(set(y.tolist())) == list(range(10)) and len(x) == 10 * 20  # every class, from the meta-code


def test_only_hypernetwork_updates_leave_a_client(one_round):
    fed, record, sent, shared = one_round
    assert {k: c.status for k, c in record.clients.items()} == {0: REPLIED, 1: REPLIED}
    names = set(FiLMHypernetwork(fed.strategy.spec).state_dict())
    received = load_downlink(shared / "server-to-clients.safetensors").payload.tensors
    assert sorted(c for c, *_ in sent) == [0, 1]
    for client, blob, meta, state in sent:
        assert meta["kind"] == UPDATE_KIND and meta["extra_artifacts"] == [] and meta["report"]["loss"] is None
        assert set(meta) == {"format", "direction", "round", "kind", "spec", "extra_artifacts", "client",
                             "num_samples", "report", "sha256", "bytes"}
        path = shared / f"client-{client}.safetensors"
        assert path.read_bytes() == blob  # what the engine carried is what the server wrote and read
        up = load_uplink(path)
        assert set(up.tensors) == names
        # positive control: the update is the client's trained hypernetwork minus the one it received
        trained = {k: received[k] + up.tensors[k] for k in names}
        assert not all(torch.equal(trained[k], received[k]) for k in names)
        assert set(state) >= {"code", "encoder"} and not any(k.startswith("hyper") for k in state)


def test_the_private_code_and_encoder_never_leave(one_round):
    fed, _, sent, shared = one_round
    secrets, codes = [], []
    for k in (0, 1):
        client = fed.client(k, 1)
        code = client.model.code_vector.detach()
        assert not torch.equal(code, code_anchor(fed.cfg.seed, k, 4))  # it trained: the code is private now
        secrets.append(code)
        codes += code.tolist()
        secrets += [t.detach()[:8].flatten() if t.dim() == 1 else t.detach()[0] for t in
                    client.model.encoder.state_dict().values()]
    # positive control: the detector finds them in what the clients keep
    kept = [v for *_, state in sent for group in ("code", "encoder") for v in state[group].values()]
    assert all(any(contains_run(t, s) for t in kept) for s in secrets)
    files = sorted(shared.iterdir())
    assert {p.suffix for p in files} == {".safetensors", ".json"}
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    t = fh.get_tensor(key)
                    assert not any(contains_run(t, s) for s in secrets), (path.name, key)
        else:
            text = path.read_text()
            assert "code" not in json.loads(text).get("extra_artifacts", [])
            assert not any(f"{v:.6g}" in text for v in codes)  # the codes' values, as printed
    for _, blob, meta, _ in sent:  # and the sidecars on the wire, before anything wrote them
        assert not any(json.dumps(v) in json.dumps(meta) for v in codes)


def test_inspect_upload_shows_the_update_and_the_hypernetwork(one_round, capsys):
    _, _, _, shared = one_round
    assert main(["inspect-upload", str(shared / "client-1.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "valid hypernetwork_update uplink from client 1, round 0" in out and "encoder present: no" in out
    assert "private code, its encoder and its generated decoder stay on the client" in out
    assert main(["inspect-upload", str(shared / "server-to-clients.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "hypernetwork" and info["recipients"] == [0, 1] and info["encoder_present"] is False


def test_each_round_is_one_ledger_event_per_client(one_round):
    fed, _, sent, _ = one_round
    for client, _, meta, state in sent:
        setup = fed.setups[client]
        (event,) = meta["report"]["dp_events"]
        plan = setup.dp_plan
        assert event["sample_rate"] == pytest.approx(32 / setup.num_samples) == plan.sample_rate
        assert event["noise_multiplier"] == DP["noise_multiplier"] and event["steps"] == plan.steps_per_epoch
        assert event["scope"] == "full" and event["grad_sample_mode"] == "bk" and event["round"] == 0
        assert state["events"] == [event]


# ------------------------------------------------------------------------------------ the DP mechanism
def _model() -> tuple[HyperCVAE, torch.Tensor, torch.Tensor]:
    cfg = from_dict(HV)
    spec = hyper_spec(cfg.strategy, cfg.client_specs()[0])
    model = HyperCVAE(spec, seeded_generator(0, 1))
    model.hyper.load_state_dict(FiLMHypernetwork(spec, seeded_generator(0, 2)).state_dict())
    x = torch.rand(6, 1, 28, 28, generator=seeded_generator(0, 3))
    return model, x, onehot(torch.tensor([0, 1, 2, 3, 4, 0]))


def _loss(model, x, y1h, monkeypatch):
    """The per-record loss with the reparameterization noise at zero (z = mu), so that a batch and its records
    one by one see the same numbers."""
    import federation.hyper_client as hc

    monkeypatch.setattr(hc, "reparameterization_noise", lambda mu, generator: torch.zeros_like(mu))
    return model.per_sample_loss(x, y1h, 1.0, None)


def test_book_keeping_gives_every_records_exact_gradient_of_code_encoder_and_hypernetwork(monkeypatch):
    model, x, y1h = _model()
    params = [p for p in model.parameters()]
    expected = []
    for i in range(len(x)):  # each record alone: its own gradient, every parameter the client trains
        grads = torch.autograd.grad(_loss(model, x[i:i + 1], y1h[i:i + 1], monkeypatch).sum(), params)
        expected.append(torch.cat([g.flatten() for g in grads]).norm())
    keeper = LinearBookkeeper(model)
    assert {id(p) for layer in keeper.layers for p in layer.parameters()} == {id(p) for p in params}
    with keeper.recording():
        backprops = keeper.backprops(_loss(model, x, y1h, monkeypatch))
    assert torch.allclose(keeper.per_sample_norms(backprops, len(x)), torch.stack(expected), rtol=1e-4)
    assert any(layer is model.code for layer in keeper.layers)  # the private code is privatized too


def test_dp_noise_covers_the_gradient_and_the_mmd_embedding_at_sqrt2_times_the_clip_bound():
    """With every record's loss constant, the released gradient is pure noise: its std must be
    sigma * sqrt(2) * C / (q n) with the MMD embedding released beside it, and sigma * C / (q n) without."""
    model, _, _ = _model()
    spec = PrivacySpec(mechanism="dp-sgd", noise_multiplier=1.5, clipping="fixed", max_grad_norm=0.7)
    plan = make_plan(spec, 100, 25, 1.5)
    x, y1h = torch.rand(25, 1, 28, 28), onehot(torch.zeros(25, dtype=torch.long))
    for features, factor in ((lambda a, b: torch.nn.functional.normalize(torch.ones(len(a), 4096), dim=1),
                              math.sqrt(2)), (None, 1.0)):
        step = HyperDPStep(model, spec, plan, 100, seeded_generator(0, 5), features)
        _, embedding = step.release(x, y1h, lambda a, b: (model.code(a.new_ones(len(a), 1)) * 0).sum(1))
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert grads.std().item() == pytest.approx(1.5 * factor * 0.7 / 25, rel=0.02)
        assert (embedding is None) == (features is None)
        if embedding is not None:  # the embedding's noise, in units of its clip-scaled features: the same sigma
            centred = embedding - torch.nn.functional.normalize(torch.ones(1, 4096), dim=1)
            assert centred.std().item() == pytest.approx(1.5 * factor / 25, rel=0.05)
        for p in model.parameters():
            p.grad = None



def test_one_record_moves_the_joint_release_by_at_most_sqrt2_times_the_clip_bound(monkeypatch):
    """The sensitivity the noise is calibrated to: without noise, removing any one record of a batch changes
    the released (clipped gradient sum, clip-scaled embedding sum) by at most sqrt(2) C in L2."""
    import federation.hyper_client as hc
    from federation.mmd import RandomFeatures

    monkeypatch.setattr(hc, "reparameterization_noise", lambda mu, generator: torch.zeros_like(mu))
    model, _, _ = _model()
    features = RandomFeatures(64, 10.0, 10, seeded_generator(0, 9))
    n, batch, bound = 100, 12, 0.05
    x = torch.rand(batch, 1, 28, 28, generator=seeded_generator(0, 3))
    y1h = onehot(torch.arange(batch) % 5)

    def released(keep: list[int]) -> torch.Tensor:
        spec = PrivacySpec(mechanism="dp-sgd", noise_multiplier=1e-9, clipping="fixed", max_grad_norm=bound)
        plan = make_plan(spec, n, batch, 1e-9)
        step = HyperDPStep(model, spec, plan, n, seeded_generator(0, 5), features)
        _, embedding = step.release(x[keep], y1h[keep], lambda a, b: model.per_sample_loss(a, b, 1.0, None))
        qn = plan.sample_rate * n
        grads = torch.cat([p.grad.flatten() for p in model.parameters()]) * qn
        for p in model.parameters():
            p.grad = None
        return torch.cat([grads, embedding.flatten() * bound * qn])  # back to sums

    everyone = list(range(batch))
    full = released(everyone)
    moves = [(full - released([i for i in everyone if i != j])).norm().item() for j in everyone]
    assert max(moves) <= math.sqrt(2) * bound * (1 + 1e-4)
    assert max(moves) > bound  # the embedding's share is really there: more than the gradient's bound alone

# ------------------------------------------------------------------------------------ uploads
class Replay(Engine):
    """Answers a round with the arrivals it is given (what a dishonest client could send)."""

    name = "replay"

    def __init__(self, arrivals):
        self.arrivals = arrivals

    def busy(self):
        return set()

    def exchange(self, rnd, downlinks):
        return Exchange(arrivals=list(self.arrivals))


def _arrival(client: int, payload: Payload, rnd: int = 0) -> Arrival:
    blob, meta = encode(Uplink(client, rnd, payload, 150, ClientReport("trained", None, [])))
    return Arrival(client, rnd, blob, meta)


def test_an_upload_with_anything_beyond_a_hypernetwork_update_is_rejected_before_use(tmp_path):
    from alignfl_audit.orchestrate import build_strategy

    strategy = build_strategy(from_dict(HV))
    seen = []
    original = strategy.aggregate_round
    strategy.aggregate_round = lambda rnd, replies: (seen.append(replies), original(rnd, replies))[1]
    zeros = {k: torch.zeros_like(v) for k, v in strategy.hyper.state_dict().items()}
    code = torch.rand(4, 1)
    other_spec = {**strategy.spec, "code_dim": 5}
    from federation.hypernetwork import hypernetwork_tensors

    arrivals = [
        _arrival(0, Payload(UPDATE_KIND, dict(strategy.spec), zeros, {"code": {"weight": code}})),  # an extra artifact
        _arrival(1, Payload(UPDATE_KIND, dict(strategy.spec), {**zeros, "code": code})),  # an extra tensor
    ]
    before = {k: v.clone() for k, v in strategy.hyper.state_dict().items()}
    record, _ = run_round(0, strategy, Replay(arrivals), tmp_path, [], [0, 1])
    assert {k: c.status for k, c in record.clients.items()} == {0: REJECTED, 1: REJECTED}
    assert "carries nothing beyond its own tensors" in record.clients[0].reason
    assert "unexpected ['code']" in record.clients[1].reason
    wrong = {k: torch.zeros(v.shape) for k, v in hypernetwork_tensors(other_spec).items()}
    record, _ = run_round(1, strategy, Replay([_arrival(0, Payload(UPDATE_KIND, other_spec, wrong), 1)]),
                          tmp_path / "r1", [], [0, 1])
    assert record.clients[0].status == REJECTED and "not the one the server holds" in record.clients[0].reason
    assert seen == [[], []]  # the strategy never received any of them
    assert all(torch.equal(v, before[k]) for k, v in strategy.hyper.state_dict().items())
    with pytest.raises(UploadRejected):
        load_uplink(tmp_path / "client-0.safetensors")


# ------------------------------------------------------------------------------------ synthesis
def test_synthesis_is_class_conditional_from_the_meta_code_or_a_mixture_of_meta_codes():
    from alignfl_audit.orchestrate import build_strategy

    meta = build_strategy(from_dict(HV))
    codes, counts = meta.synthesis_plan(20)
    assert torch.equal(codes, torch.zeros(1, 4)) and counts == [[20] * 10]
    mix = build_strategy(from_dict(tiny_config(**{**HV, "server": {**HV["server"], "synthesis": "mixture",
                                                                     "mixture_weights": [0.75, 0.25]}})))
    codes, counts = mix.synthesis_plan(20)  # 200 records: 150 of client 0's classes from its anchor, 50 of client 1's
    assert torch.equal(codes, torch.stack([code_anchor(0, 0, 4), code_anchor(0, 1, 4)]))
    assert counts == [[30] * 5 + [0] * 5, [0] * 5 + [10] * 5]
    x, y = mix.synthesize(20, seeded_generator(0, 6))
    assert x.shape == (200, 1, 28, 28) and torch.bincount(y, minlength=10).tolist() == [30] * 5 + [10] * 5


def test_the_lipschitz_penalty_is_the_exact_jacobian_norm_of_the_generated_decoder():
    cfg = from_dict(HV)
    hyper = FiLMHypernetwork(hyper_spec(cfg.strategy, cfg.client_specs()[0]), seeded_generator(0, 7)).double()
    code = torch.randn(4, dtype=torch.float64, generator=seeded_generator(0, 8))

    def generated(c):
        gains, shifts, means = hyper.generate(c.view(1, -1))
        parts = [means.flatten()]
        for l, layer in enumerate(hyper.base):
            parts += [((1 + gains[l][0]).unsqueeze(1) * layer.weight).flatten(), (1 + gains[l][0]) * layer.bias
                      + shifts[l][0]]
        return torch.cat(parts)

    jac = torch.func.jacfwd(generated)(code)
    assert hyper.jacobian_sq_norm(code).item() == pytest.approx(jac.pow(2).sum().item(), rel=1e-9)


def test_cross_domain_records_carry_one_of_their_clients_labels_by_record_id():
    fed_cfg = from_dict(HV)
    from alignfl_audit.orchestrate import prepare

    _, partition, setups = prepare(fed_cfg)
    shard = partition.shards[0]
    labels = setups[0].labels
    assert len(labels) == setups[0].num_samples and setups[0].label_set == [0, 1, 2, 3, 4]
    assert labels[-4:].tolist() == [int(i) % 5 for i in shard.outlier_ids]
    assert set(setups[1].labels.tolist()) == {5, 6, 7, 8, 9}


# ------------------------------------------------------------------------------------ bad input
BAD = {
    "code-size-0": ({"strategy": {"code_dim": 0}}, "strategy.code_dim must be > 0, got 0"),
    "mmd-negative": ({"strategy": {"mmd_weight": -0.5}}, "strategy.mmd_weight must be >= 0, got -0.5"),
    "lipschitz-negative": ({"strategy": {"lipschitz_weight": -1}}, "strategy.lipschitz_weight must be >= 0"),
    "mixture-sum": ({"server": {"synthesis": "mixture", "mixture_weights": [0.5, 0.4]}},
                    "server.mixture_weights must sum to 1"),
    "mixture-negative": ({"server": {"synthesis": "mixture", "mixture_weights": [1.5, -0.5]}},
                         "server.mixture_weights must be non-negative"),
    "mixture-without-mixture": ({"server": {"mixture_weights": [0.5, 0.5]}},
                                "server.mixture_weights applies only with server.synthesis: mixture"),
    "budget-unmeetable": ({"privacy": {"mechanism": "dp-sgd", "target_epsilon": 1e-6, "noise_multiplier": None,
                                       "clipping": "fixed"}}, "cannot be met with sampling rate"),
    "scope-decoder": ({"privacy": {"scope": "decoder"}}, "privacy.scope must be full for fedhypevae"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line_and_leaves_no_run(name, tmp_path, capsys):
    change, text = BAD[name]
    data = tiny_config(**{**HV, **{k: {**HV[k], **v} for k, v in change.items()}})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("alignfl-audit: error:") and text in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------------ whole runs
@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    from alignfl_audit.orchestrate import run_experiment

    return run_experiment(from_dict(HV), out=tmp_path_factory.mktemp("hv-run") / "run", quiet=True).path


def test_dp_accounting_runs_through_the_ledger(dp_run):
    from opacus.accountants import RDPAccountant

    ledger = json.loads((dp_run / "privacy_ledger.json").read_text())
    metrics = json.loads((dp_run / "metrics.json").read_text())
    assert ledger["formal_guarantee"] is True and metrics["shared_artifacts"] == [
        "hypernetwork_update", "hypernetwork_spec", "hypernetwork (downlink)"]
    for k in ("0", "1"):
        events = [e for e in ledger["events"] if str(e["client"]) == k]
        assert [e["round"] for e in events] == [0, 1]
        assert all(e["noise_multiplier"] == DP["noise_multiplier"] and e["sample_rate"] == ledger["clients"][k]["sample_rate"]
                   for e in events)
        assert sum(e["steps"] for e in events) == ledger["clients"][k]["planned_steps"]
        client = metrics["privacy"]["clients"][k]
        result = client["relations"]["add-remove"]  # Opacus's relation: its RDP accountant reproduces it
        assert set(result["accountants"]) == {"opacus_rdp", "opacus_prv", "dp_accounting_rdp", "dp_accounting_pld"}
        acc = RDPAccountant()
        acc.history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in events]
        assert result["accountants"]["opacus_rdp"]["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5))
        # the headline is replace-one, which bounds add/remove from above
        assert client["headline"]["relation"] == "replace-one"
        assert result["headline"]["epsilon"] <= client["headline"]["epsilon"] < math.inf


def _same_files(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in (a / "shared").rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(b) for p in (b / "shared").rglob("*") if p.is_file())
    for rel in files + [Path("privacy_ledger.json"), Path("rounds.csv")]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    ma, mb = (json.loads((x / "metrics.json").read_text()) for x in (a, b))
    assert ma["utility"] == mb["utility"] and ma["privacy"] == mb["privacy"]


def test_a_resumed_run_equals_the_uninterrupted_one(dp_run, tmp_path, monkeypatch):
    import alignfl_audit.orchestrate as orchestrate

    original = orchestrate.run_round

    def interrupted(rnd, *args, **kwargs):
        if rnd == 1:
            raise KeyboardInterrupt
        return original(rnd, *args, **kwargs)

    monkeypatch.setattr(orchestrate, "run_round", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        orchestrate.run_experiment(from_dict(HV), out=out, quiet=True)
    assert (out / "checkpoints" / "latest.pt").is_file() and not (out / "metrics.json").exists()
    monkeypatch.setattr(orchestrate, "run_round", original)
    orchestrate.resume_experiment(out, quiet=True)
    assert "resumed after round 0" in (out / "run.log").read_text()
    _same_files(dp_run, out)


class LoopbackGrid:
    """Flower's Grid with the transport replaced by direct calls of the bundled ClientApp's handlers, one
    Context per node kept between messages (as a SuperNode keeps it): the Flower engine, the Flower
    messages and the ClientApp (its setup, its state as safetensors bytes in Context.state) run as on a
    SuperLink, without starting one."""

    def __init__(self, partitions: dict[int, int]):
        from flwr.app import Context, RecordDict

        self.contexts = {node: Context(run_id=1, node_id=node, node_config={"partition-id": k}, state=RecordDict(),
                                       run_config={}) for node, k in partitions.items()}
        self.replies: dict[str, object] = {}

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        from alignfl_audit import flower_app
        from federation.engines.flower_wire import HELLO

        ids = []
        for m in messages:
            mid = f"m{len(self.replies) + len(ids)}-{m.metadata.group_id}-{m.metadata.dst_node_id}"
            m.metadata.__dict__["_message_id"] = mid
            node = m.metadata.dst_node_id
            handler = flower_app._hello if m.metadata.message_type == HELLO else flower_app._train
            reply = handler(m, self.contexts[node])
            reply.metadata.__dict__["_src_node_id"] = node
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in ids if i in self.replies]


@pytest.mark.usefixtures("in_a_serverapp")
def test_the_flower_apps_give_the_in_process_result(dp_run, tmp_path):
    from flwr.app import Context, RecordDict

    from alignfl_audit import flower_app
    from alignfl_audit.orchestrate import prepare, write_run_header
    from alignfl_audit.rundir import RunDir

    cfg = from_dict({**HV, "engine": {"name": "flower"}})
    _, partition, _ = prepare(cfg)
    run = RunDir.create(tmp_path / "run", cfg.name, cfg.seed)
    write_run_header(run, cfg, partition)
    server = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                     run_config={"run-dir": str(run.path), "threads": torch.get_num_threads()})
    flower_app._server_main(LoopbackGrid({201: 1, 202: 0}), server)
    _same_files(dp_run, run.path)
    assert json.loads((run.path / "metrics.json").read_text())["engine"]["name"] == "flower"


# ------------------------------------------------------------------------------------ the audit
def _small_hyper(seed: int = 9):
    cfg = from_dict(HV)
    return FiLMHypernetwork(hyper_spec(cfg.strategy, cfg.client_specs()[0]), seeded_generator(0, seed))


def test_a_generated_decoder_is_the_hypernetworks_decoder_as_a_plain_mlp():
    from federation.hypernetwork import generated_decoder

    hyper, code, u = _small_hyper(), torch.randn(4, generator=seeded_generator(0, 10)), torch.randn(5, 2)
    gains, shifts, means = hyper.generate(code.view(1, -1))
    for y in (0, 7):
        expected = hyper.decode(u + means[0, y], onehot(torch.full((5,), y)), gains, shifts)
        decoder = generated_decoder(hyper, code, y)
        assert all(type(m) in (torch.nn.Linear, torch.nn.ReLU, torch.nn.Sigmoid, torch.nn.Unflatten) for m in decoder)
        assert torch.allclose(decoder(u), expected, atol=1e-6)


def test_the_code_search_moves_from_the_anchor_towards_the_code_that_made_the_records():
    from attacks.hyper_code import search_code
    from federation.hypernetwork import synthesize

    hyper = _small_hyper()
    hyper.requires_grad_(False)
    true_code = torch.randn(4, generator=seeded_generator(0, 11))
    x, y = synthesize(hyper, true_code.view(1, -1), [[40] * 3], [0, 1, 2], seeded_generator(0, 12))
    anchor = true_code + 0.8 * torch.nn.functional.normalize(torch.randn(4, generator=seeded_generator(0, 13)), dim=0)
    found = search_code(hyper, anchor, x, y.numpy(), seeded_generator(0, 14), lam=0.01, init=256, steps=150,
                        anchor_weight=0.0)
    assert (found - true_code).norm() < 0.5 * (anchor - true_code).norm()


def test_update_alignment_is_the_cosine_of_each_records_gradient_with_the_update():
    """Against explicit per-record autograd, with an update that is one gradient step on the members' latent-fit
    losses: the book-kept cosines are exact, and members score above non-members on average."""
    from attacks.hyper_code import GeneratedDecoders, fit_by_class, update_alignment
    from attacks.shared_artifacts import SharedDecoder
    from federation.data.sources import load_split, resolve_source
    from federation.training import to_tensor

    start = _small_hyper()
    code = torch.randn(4, generator=seeded_generator(0, 15))
    split = load_split(resolve_source("mnist", allow_embedded=True), "mnist", "train")
    keep = np.flatnonzero(split.labels < 3)[:40]
    records, labels, y = to_tensor(split.images[keep]), split.labels[keep], torch.as_tensor(split.labels[keep])
    members = torch.arange(40) % 2 == 0
    options = dict(lam=0.01, init=64, steps=10)
    fit = fit_by_class(GeneratedDecoders(start, code), records, labels, seeded_generator(0, 16), restarts=1, **options)

    def gradient(i):  # record i's latent-fit loss at the fitted latent, by autograd on that record alone
        gains, shifts, means = start.generate(code.view(1, -1))
        recon = start.decode(fit.latents[i:i + 1] + means[0, y[i:i + 1]], onehot(y[i:i + 1]), gains, shifts)
        loss = (recon.flatten(1) - records[i:i + 1].flatten(1)).pow(2).sum() + 0.01 * fit.latents[i].pow(2).sum()
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(start.parameters()))])

    grads = torch.stack([gradient(i) for i in range(40)]).double()
    step = grads[members].sum(0)
    update, offset = {}, 0
    for name, p in start.named_parameters():
        update[name] = (-0.01 * step[offset:offset + p.numel()]).view_as(p).float()
        offset += p.numel()
    shared = SharedDecoder(0, 0, start.spec, None, UPDATE_KIND, [], start, update, None, 0)
    scores = update_alignment([shared], code, records, labels, seeded_generator(0, 16), **options)
    expected = (grads @ step / (grads.norm(dim=1) * step.norm())).numpy()
    assert np.allclose(scores, expected, atol=1e-4)
    assert scores[members.numpy()].mean() > scores[~members.numpy()].mean()


def test_the_audit_attacks_what_the_fedhypevae_server_holds(dp_run):
    from alignfl_audit.audit import run_audit

    small = {"audit.members_per_client": 20, "audit.generated_samples": 200, "audit.bootstrap": 10,
             "audit.latent_fit_steps": 5, "audit.latent_fit_init": 32, "audit.latent_fit_restarts": 1,
             "audit.lipschitz_prior_points": 8, "audit.lipschitz_ascent_steps": 1, "audit.inliers": 8}
    audit = json.loads(run_audit(dp_run, overrides=small, quiet=True).read_text())
    assert set(audit["mia"]) == {"white_box_latent_fit", "monte_carlo", "nearest_generated_sample", "update_alignment"}
    assert audit["shared_artifacts"] == ["hypernetwork_update"] and "hypernetwork update" in audit["threat_model"]
    assert set(audit["code_search"]["clients"]) == {"0", "1"} and "not applicable" in audit["reference_models"]
    for k in ("0", "1"):
        bracket = audit["lipschitz"][k]
        assert set(bracket["rounds"]) == {"0", "1"}
        for per_class in bracket["rounds"]["1"]["classes"].values():
            assert per_class["lower"] <= per_class["upper"]
    assert audit["outliers"]["groups"]["outliers"]["n"] == 4 and audit["accountant"]["formal_guarantee"] is True


def test_the_fedhypevae_audit_brackets_only_the_rounds_audit_lipschitz_rounds_chooses(dp_run):
    """``audit.lipschitz_rounds`` holds for FedHypeVAE as for ALIGN-FL: with 1, only the last round's generated
    decoders are bracketed, and the rounds left out are recorded."""
    import dataclasses

    from alignfl_audit.audit import _lipschitz
    from alignfl_audit.audit_hyper import HyperView, seed_of
    from alignfl_audit.orchestrate import label_sets
    from attacks.shared_artifacts import load_shared_run
    from federation.data.sources import load_split, resolve_source
    from federation.training import to_tensor

    cfg = from_dict(HV)
    a = dataclasses.replace(cfg.audit, lipschitz_rounds=1, members_per_client=10, latent_fit_steps=2,
                            latent_fit_init=16, lipschitz_prior_points=4, lipschitz_ascent_steps=1)
    shared = load_shared_run(dp_run)
    clients = shared.partition["clients"]
    codes = {c["client"]: code_anchor(seed_of(shared), c["client"], 4) for c in clients}  # no search: not tested here
    hyper = HyperView(shared, codes, label_sets(cfg), {})
    split = load_split(resolve_source("mnist", allow_embedded=True), "mnist", "train")
    out = _lipschitz(shared, clients, to_tensor(split.images), split.labels, a, 0, hyper)
    for k in ("0", "1"):
        assert set(out[k]["rounds"]) == {"1"} and out[k]["rounds_not_bracketed"] == [0]
        assert out[k]["upper"] == out[k]["rounds"]["1"]["upper"]


def test_a_sweep_counts_no_reference_models_for_a_fedhypevae_audit():
    """The audit of a FedHypeVAE run trains no references (no decoder is shared): one step per client's game,
    then outliers, Lipschitz and canaries; the same config under ALIGN-FL counts a reference per client too."""
    from alignfl_audit.progress import run_steps

    hv = from_dict({**HV, "audit": {"enabled": True, "reference_models": True}})
    alignfl = from_dict({**HV, "audit": {"enabled": True, "reference_models": True}, "strategy": {"name": "alignfl"},
                         "server": None})
    assert run_steps(hv) == 2 + 1 + 2 * 1 + 3
    assert run_steps(alignfl) == 2 + 1 + 2 * 2 + 3
