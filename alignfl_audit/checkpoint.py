"""Crash-resume of an in-process run: after every round, everything needed to continue is written
atomically to ``checkpoints/latest.pt`` (write, then rename): every client's saved state and the replies
still in flight (the engine's), the server's state (the strategy's), the privacy ledger's events and the
round records so far. Random streams are derived from (seed, client, round), so there is no generator
state to save.

Checkpoints never leave the run directory and are never read by attacks/. They hold only tensors and
plain containers, and are read back with ``torch.load(weights_only=True)``: no arbitrary unpickling.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from federation import run_layout as layout
from federation.errors import DataError
from federation.privacy.ledger import DPEvent
from federation.rounds import RoundRecord

FORMAT = "alignfl-checkpoint/2"


def save_checkpoint(run, rnd: int, config_sha256: str, strategy, engine, ledger, records: list[RoundRecord],
                    code: dict | None = None) -> Path:
    """``code``: the code identity (``provenance.code_identity``) the rounds so far were trained with."""
    state = {"format": FORMAT, "round": rnd, "config_sha256": config_sha256, "code": code,
             "engine": engine.state_dict(), "strategy": strategy.state_dict(),
             "ledger_events": [vars(e).copy() for e in ledger.events], "unaccounted": dict(ledger.unaccounted),
             "records": [r.to_json() for r in records]}
    folder = run.file(layout.CHECKPOINTS)
    folder.mkdir(exist_ok=True)
    path = folder / layout.CHECKPOINT
    tmp = folder / f"{layout.CHECKPOINT}.tmp"
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path


def load_checkpoint(run, config_sha256: str) -> dict | None:
    state = _read(run)
    if state is not None and state["config_sha256"] != config_sha256:
        raise DataError(f"{run.file(layout.CHECKPOINTS, layout.CHECKPOINT)} was written for another config "
                        f"(sha256 {state['config_sha256'][:12]}); the run directory's config.resolved.yaml has changed")
    return state


def checkpoint_header(run) -> dict | None:
    """A checkpoint's last round, config digest and code identity, read without loading its tensors
    (memory-mapped); None when the run has none or it cannot be read."""
    try:
        state = _read(run, mmap=True)
    except DataError:
        return None
    if state is None or not isinstance(state.get("round"), int) or not isinstance(state.get("config_sha256"), str):
        return None
    return {"round": state["round"], "config_sha256": state["config_sha256"], "code": state.get("code")}


def _read(run, mmap: bool = False) -> dict | None:
    path = run.file(layout.CHECKPOINTS, layout.CHECKPOINT)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint gets the same one-line error
        raise DataError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise DataError(f"{path} is not an {FORMAT} checkpoint" +
                        (f" (it is {found}, written by an earlier version: start the run again)" if found else ""))
    return state


def restore(state: dict, strategy, engine, ledger, shared_root: Path) -> tuple[int, list[RoundRecord]]:
    """Load a checkpoint into freshly built objects; returns (next round, round records)."""
    engine.load_state_dict(state["engine"])
    strategy.load_state_dict(state["strategy"], shared_root)
    ledger.events = [DPEvent(**e) for e in state["ledger_events"]]  # exactly the events up to that round
    ledger.unaccounted = dict(state["unaccounted"])
    return state["round"] + 1, [RoundRecord.from_json(r) for r in state["records"]]
