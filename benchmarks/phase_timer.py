"""Run the CLI with wall-clock timers around the functions each phase of a run goes through, and write the
seconds per phase to a JSON file:

    python benchmarks/phase_timer.py TIMES.json run CONFIG --out RUN ...

The timed functions exist under the same names at the reference commit of the performance benchmark and
here, so both sides are measured the same way:

- client_training: ``federation.client.Client.train_round`` (every client's local training);
- server_synthesis / server_training: ``AlignFLServer.synthesize`` / ``AlignFLServer.train_global``;
- probes: the per-round probe of the global model (``alignfl_audit.orchestrate.probe``);
- metrics: the utility metrics after training (``orchestrate.evaluate`` and ``orchestrate.domain_cnn``).

The audit's phases are in the run's audit.json (``timing_seconds``), on both sides.
"""
from __future__ import annotations

import atexit
import functools
import importlib
import json
import sys
import time
from pathlib import Path

PHASES = {
    "client_training": ("federation.client", "Client", "train_round"),
    "server_synthesis": ("federation.server", "AlignFLServer", "synthesize"),
    "server_training": ("federation.server", "AlignFLServer", "train_global"),
    "probes": ("alignfl_audit.orchestrate", None, "probe"),
    "metrics": ("alignfl_audit.orchestrate", None, "evaluate"),
    "metrics_domain_cnn": ("alignfl_audit.orchestrate", None, "domain_cnn"),
}


def install(seconds: dict[str, float]) -> None:
    for phase, (module_name, owner_name, attr) in PHASES.items():
        owner = importlib.import_module(module_name)
        if owner_name:
            owner = getattr(owner, owner_name)
        original = getattr(owner, attr)

        def timed(*args, __original=original, __phase=phase, **kwargs):
            t0 = time.perf_counter()
            try:
                return __original(*args, **kwargs)
            finally:
                seconds[__phase] = seconds.get(__phase, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, functools.wraps(original)(timed))


def main() -> int:
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # import the product from PYTHONPATH (either side), never from benchmarks/
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    atexit.register(lambda: out.write_text(json.dumps(
        {**{k: round(v, 3) for k, v in seconds.items()}, "process": round(time.perf_counter() - started, 3)})))
    install(seconds)
    from alignfl_audit.cli import main as cli

    return cli(argv)


if __name__ == "__main__":
    sys.exit(main())
