"""Federation strategies, by config name. Adding a strategy is one module (its settings, its server
side and its client side, see ``federation.strategies.base``) and one line here."""
from __future__ import annotations

from federation.errors import ConfigError
from federation.strategies.alignfl import AlignFL
from federation.strategies.base import Strategy
from federation.strategies.centralized import Centralized
from federation.strategies.fedavg import FedAvg, FedProx
from federation.strategies.fedhypevae import FedHypeVAE

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (AlignFL, FedAvg, FedProx, Centralized, FedHypeVAE)}


def strategy_class(name) -> type[Strategy]:
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {list(STRATEGIES)}")
    return STRATEGIES[name]
