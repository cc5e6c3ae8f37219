"""The Flower engine's config section (kept apart from the engine so that reading a config never
imports Flower)."""
from __future__ import annotations

import typing
from dataclasses import dataclass

from federation.errors import ConfigError

MODES = ("simulation", "deployment")


@dataclass
class FlowerSettings:
    name: str = "flower"
    mode: str = "simulation"  # simulation: Flower's simulation runtime; deployment: a real SuperLink
    superlink: typing.Optional[str] = None  # deployment: the SuperLink's Control API address, host:port
    round_timeout: float = 600.0  # seconds a round waits for replies; a later reply is used in a later round
    connect_timeout: float = 60.0  # seconds to reach the SuperLink, and for every client's node to connect
    client_cpus: int = 1  # simulation: CPUs reserved per virtual client

    def check(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"engine.mode must be one of {list(MODES)}, not {self.mode!r}")
        if self.mode == "deployment" and not self.superlink:
            raise ConfigError("engine.superlink (host:port of the SuperLink's Control API) is needed in deployment mode")
        if self.mode == "simulation" and self.superlink:
            raise ConfigError("engine.superlink applies to deployment mode only; simulation starts its own SuperLink")
        for key in ("round_timeout", "connect_timeout"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"engine.{key} must be > 0 seconds, got {getattr(self, key)}")
        if self.client_cpus < 1:
            raise ConfigError(f"engine.client_cpus must be >= 1, got {self.client_cpus}")
