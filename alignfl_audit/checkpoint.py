"""Crash-resume: after every round, everything needed to continue is written atomically to
``checkpoints/latest.pt`` (write, then rename): every client's model, optimizer, DP-trainer and RNG
state, the server's, the global torch RNG, the privacy ledger and the rows written so far.

Checkpoints never leave the run directory and are never read by attacks/. They hold only tensors and
plain containers, and are read back with ``torch.load(weights_only=True)``: no arbitrary unpickling.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from federation.errors import DataError
from federation.privacy.ledger import DPEvent

FORMAT = "alignfl-checkpoint/1"


def save_checkpoint(run, rnd: int, config_sha256: str, clients, strategy, ledger, rows: list, rejected: list) -> Path:
    state = {"format": FORMAT, "round": rnd, "config_sha256": config_sha256,
             "clients": [c.state_dict() for c in clients], "strategy": strategy.state_dict(),
             "torch_rng": torch.get_rng_state(), "ledger_events": [vars(e).copy() for e in ledger.events],
             "rows": rows, "rejected": rejected}
    folder = run.file("checkpoints")
    folder.mkdir(exist_ok=True)
    path = folder / "latest.pt"
    tmp = folder / "latest.pt.tmp"
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path


def load_checkpoint(run, config_sha256: str) -> dict | None:
    path = run.file("checkpoints", "latest.pt")
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint gets the same one-line error
        raise DataError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"{path} is not an {FORMAT} checkpoint")
    if state["config_sha256"] != config_sha256:
        raise DataError(f"{path} was written for another config (sha256 {state['config_sha256'][:12]}); "
                        "the run directory's config.resolved.yaml has changed")
    return state


def restore(state: dict, clients, strategy, ledger, shared_root: Path) -> tuple[int, list, list]:
    """Load a checkpoint into freshly built objects; returns (next round, rows, rejected)."""
    for client, cstate in zip(clients, state["clients"], strict=True):
        client.load_state_dict(cstate)
    strategy.load_state_dict(state["strategy"], shared_root)
    ledger.events = [DPEvent(**e) for e in state["ledger_events"]]  # exactly the events up to that round
    torch.set_rng_state(state["torch_rng"])
    return state["round"] + 1, list(state["rows"]), list(state["rejected"])
