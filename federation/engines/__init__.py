"""Engines, by config name: each carries a strategy's encoded messages (``federation.engines.base``).
Adding an engine is one module (its settings with a ``check``, and the engine) and one line here."""
from __future__ import annotations

from federation.engines.flower_settings import FlowerSettings
from federation.engines.inprocess import InProcessSettings
from federation.errors import ConfigError

ENGINES: dict[str, type] = {"inprocess": InProcessSettings, "flower": FlowerSettings}


def engine_settings_class(name) -> type:
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; choose one of {list(ENGINES)}")
    return ENGINES[name]
