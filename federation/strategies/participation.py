"""Client dropout: each client takes part in a round with a fixed probability, drawn from the
strategy's own seeded generator (so a run's participation pattern is reproducible and independent of
training randomness). The draw is recorded in the round's row as ``clientK_participated``."""
from __future__ import annotations

import torch

from federation.client import seeded_generator


class Participation:
    def __init__(self, probability: float, seed: int):
        self.probability = float(probability)
        self.generator = seeded_generator(seed, 6)

    def draw(self, record: dict, client_id: int) -> bool:
        takes_part = self.probability >= 1.0 or bool(torch.rand((), generator=self.generator) < self.probability)
        record[f"client{client_id}_participated"] = takes_part
        return takes_part

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
