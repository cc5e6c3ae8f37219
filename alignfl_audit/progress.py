"""One progress bar across a whole sweep, with tqdm's estimate of the time left.

A sweep counts its work in steps: each run's training rounds, its metrics, and each step of its audit
(a reference model and a membership game per client, then outliers, Lipschitz and canaries). The
orchestrator and the audit call ``advance`` as they finish a step; outside a sweep that does nothing.
The estimate is the mean time per step so far times the steps left, so it settles after the first run.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

from tqdm import tqdm

_ACTIVE: ContextVar["SweepProgress | None"] = ContextVar("sweep_progress", default=None)


def run_steps(cfg) -> int:
    """The steps one trained and audited run of ``cfg`` counts. A FedHypeVAE audit trains no reference
    models (its clients share hypernetwork updates, no decoder to train a reference of)."""
    from federation.hypernetwork import UPDATE_KIND

    references = cfg.audit.reference_models and UPDATE_KIND not in cfg.strategy_class.uplink_kinds
    audit = cfg.partition.n_clients * (2 if references else 1) + 3 if cfg.audit.enabled else 0
    return cfg.training.rounds + 1 + audit


class SweepProgress:
    def __init__(self, total: int, quiet: bool, file=None):
        # smoothing 0: the estimate uses the mean rate since the start, not the last few (uneven) steps
        self.bar = tqdm(total=total, disable=quiet, desc="sweep", unit="step", smoothing=0, position=0, file=file)
        self._run_start = 0

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def start_run(self, tag: str) -> None:
        self._run_start = self.bar.n
        self.bar.set_postfix_str(tag)

    def end_run(self, planned: int) -> None:
        """A run that failed, or counted other steps than planned, leaves the total consistent: what it
        did not do is no longer expected, what it did beyond the plan is added."""
        done = self.bar.n - self._run_start
        if done != planned:
            self.bar.total += done - planned
            self.bar.refresh()

    def drop(self, planned: int) -> None:
        """A run that is not done at all (finished before)."""
        self.bar.total -= planned
        self.bar.refresh()

    def say(self, echo, message: str) -> None:
        with tqdm.external_write_mode():
            echo(message)

    def close(self) -> None:
        self.bar.close()


@contextmanager
def sweep_progress(total: int, quiet: bool, file=None):
    progress = SweepProgress(total, quiet, file)
    token = _ACTIVE.set(progress)
    try:
        yield progress
    finally:
        _ACTIVE.reset(token)
        progress.close()


def advance(steps: int = 1) -> None:
    """One more step of the sweep done (nothing outside a sweep)."""
    progress = _ACTIVE.get()
    if progress is not None:
        progress.advance(steps)
