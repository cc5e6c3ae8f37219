"""DP accounting when replies are late, lost, repeated or forged: every step a client may have taken is
in the ledger exactly once, or no epsilon is reported for that client."""
from __future__ import annotations

import json

import pytest
import torch

from alignfl_audit.accounting import ledger_epsilons
from alignfl_audit.rundir import RunDir
from federation.engines.base import ClientFailure, handle_encoded
from federation.errors import FederationError, UploadRejected
from federation.messages import LEGACY_UPLOAD_FORMAT, Downlink, Payload, decode, encode
from federation.privacy.ledger import DPEvent, PrivacyLedger
from federation.rounds import (BUDGET_SPENT, LATE_REPLY, LOST, NO_REPLY, REPLIED, ClientRound, RoundRecord,
                               unreported_dp_rounds)


def _event(client: int, rnd: int, sigma: float = 1.0) -> DPEvent:
    return DPEvent(client, rnd, 0.1, sigma, 10, "fixed", "full", "bk", 1.0, 1.0)


def _ledger() -> PrivacyLedger:
    return PrivacyLedger(mechanism="dp-sgd", formal_guarantee=True, note="", delta=1e-5, target_epsilon=None,
                         clients={"0": {"n": 100}, "1": {"n": 100}})


def test_repeated_histories_are_counted_once():
    ledger = _ledger()
    ledger.merge([_event(0, 0)])
    ledger.merge([_event(0, 0), _event(0, 1)])  # the next report repeats round 0
    ledger.merge([_event(0, 0), _event(0, 1), _event(1, 1)])
    assert [(e.client, e.round) for e in ledger.events] == [(0, 0), (0, 1), (1, 1)]
    assert ledger.unaccounted == {}


def test_two_different_reports_of_one_round_withhold_epsilon():
    ledger = _ledger()
    ledger.merge([_event(0, 0), _event(1, 0)])
    ledger.merge([_event(0, 0, sigma=0.5)])  # a forged or corrupted repeat: less noise than recorded
    assert "two different DP reports for round 0" in ledger.unaccounted["0"]
    block = ledger_epsilons(ledger.to_json())
    assert "0" not in block["clients"] and "two different" in block["unaccounted"]["0"] and "1" in block["clients"]


def _record(rnd: int, **statuses) -> RoundRecord:
    return RoundRecord(rnd, {int(k[1:]): v for k, v in statuses.items()})


def test_a_round_with_no_usable_reply_is_unreported_unless_a_later_report_covers_it():
    records = [
        _record(0, c0=ClientRound(REPLIED), c1=ClientRound(REPLIED)),
        _record(1, c0=ClientRound(LOST), c1=ClientRound(NO_REPLY)),  # both may have trained round 1
        _record(2, c0=ClientRound(REPLIED), c1=ClientRound(LATE_REPLY, staleness=1)),
    ]
    # client 0's round-2 report repeats its round-1 event; client 1's late reply did not train (no event)
    events = [_event(0, 0), _event(0, 1), _event(0, 2), _event(1, 0)]
    assert unreported_dp_rounds(records, events, [0, 1]) == {
        1: "round(s) [1]: a message reached the client but no usable reply came back, so what it spent there "
           "is unknown"}
    # a reply saying the budget was spent covers the round it answers: nothing was trained there
    records[2].clients[1] = ClientRound(BUDGET_SPENT, staleness=1)
    assert unreported_dp_rounds(records, events, [0, 1]) == {}


def test_a_live_round_refuses_the_earlier_upload_format_that_carries_no_dp_report():
    from safetensors.torch import save

    blob = save({"w": torch.zeros(2)})
    import hashlib

    meta = {"format": LEGACY_UPLOAD_FORMAT, "client": 0, "round": 0, "num_samples": 10, "kind": "empty",
            "sha256": hashlib.sha256(blob).hexdigest()}
    with pytest.raises(UploadRejected, match="not an alignfl-message/1 sidecar"):
        decode(blob, meta, direction="uplink", name="client-0")


def test_a_client_trains_each_round_at_most_once(tiny_setup):
    setup, handler = tiny_setup
    blob, meta = encode(Downlink(0, (0,), Payload("empty")))
    _, _, state = handle_encoded(setup, handler, None, blob, meta)
    with pytest.raises(ClientFailure, match="was sent round 0 after it trained round 0"):
        handle_encoded(setup, handler, state, blob, meta)  # a replayed downlink
    blob1, meta1 = encode(Downlink(1, (0,), Payload("empty")))
    _, reply_meta, _ = handle_encoded(setup, handler, state, blob1, meta1)
    assert [e["round"] for e in reply_meta["report"]["dp_events"]] == [0, 1]  # the history, repeated


@pytest.fixture
def tiny_setup(one_torch_thread):
    from alignfl_audit.config import from_dict
    from alignfl_audit.orchestrate import prepare
    from conftest import tiny_config

    cfg = from_dict(tiny_config(privacy={"mechanism": "dp-sgd", "target_epsilon": 4.0, "delta": 1e-5},
                                training={"rounds": 2}))
    _, _, setups = prepare(cfg)
    return setups[0], cfg.strategy_class.client_handler(cfg.strategy, cfg.server)


def test_a_run_marked_failed_is_never_marked_complete(tmp_path):
    run = RunDir.create(tmp_path / "run", "x", 0)
    run.set_status("failed", error="the launcher gave up")
    with pytest.raises(FederationError, match="was marked failed"):
        run.set_status("complete")
    assert json.loads(run.file("status.json").read_text())["state"] == "failed"


def test_a_node_secret_replaces_the_run_seed_as_the_source_of_the_dp_noise(tiny_setup):
    import dataclasses

    from federation.client import Client

    setup, _ = tiny_setup
    secret = dataclasses.replace(setup, noise_secret=1234567)
    assert "run's seed" in setup.noise_source and secret.noise_source == "a secret of the client's node"
    trained = []
    for s in (setup, setup, secret):
        client = Client(s, None, 0)  # the same initial weights: CLIENT_INIT still comes from the run's seed
        client.train_round()
        trained.append(torch.cat([p.detach().flatten() for p in client.vae.decoder.parameters()]))
    assert torch.equal(trained[0], trained[1])  # the run's seed fixes the noise
    assert not torch.allclose(trained[0], trained[2])  # the secret changes it
