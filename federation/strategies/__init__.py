"""Federation strategies: the one place that knows each protocol.

A strategy is built from its clients and settings and driven round by round by the orchestrator:
``run_round(rnd, shared_dir, tick)`` trains one round, writes exactly what the clients share into
``shared_dir`` and reads it back through the validated upload path. ``global_vae`` is the model
the utility metrics evaluate; ``client_decoders()`` is the server's view of each client.
"""
from __future__ import annotations

from federation.strategies.alignfl import AlignFL
from federation.strategies.centralized import Centralized
from federation.strategies.fedavg import FedAvg

STRATEGY_CLASSES = {"alignfl": AlignFL, "fedavg": FedAvg, "fedprox": FedAvg, "centralized": Centralized}
