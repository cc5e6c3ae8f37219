"""The audit of a FedHypeVAE run: what the server can do with every round's hypernetwork and every client's
hypernetwork updates (``attacks.hyper_code``), fitted into the audit's games.

For each client, the adversary forms the hypernetwork the client trained in its last round (the round's
downlink plus the client's update) and searches the client's private code from its public anchor on the
client's membership-game candidates (members and non-members alike). The decoders generated at that code,
one per class, stand in for ALIGN-FL's shared decoder in every decoder attack: each record is scored
against its own class's decoder. Cross-domain records (outliers, controls, canaries) carry the label the
training gave them, one of the client's own by record id (``alignfl_audit.orchestrate.client_labels``);
the rule is public. The update-alignment attack scores records against the updates themselves.
"""
from __future__ import annotations

import numpy as np
import torch

from attacks.hyper_code import GeneratedDecoders, fit_by_class, score_by_class, search_code, update_alignment
from attacks.lipschitz import lipschitz_bracket
from attacks.membership import membership_game
from attacks.shared_artifacts import SharedRun
from federation.hypernetwork import code_anchor
from federation.rng import seeded_generator

THREAT_MODEL = ("the server: every round's hypernetwork (downlink) and every client's hypernetwork update (uplink), "
                "so the hypernetwork each client trained, round by round; the clients' public code anchors; "
                "candidate records. No code, no encoder, no private training state (docs/threat-model.md)")
UPDATE_ATTACK = "update_alignment"
CODE_SEARCH = 76  # the audit's generator stream of the code search (+ client)
ALIGNMENT = 77  # of the update-alignment attack's latent fits (+ client)


class HyperView:
    def __init__(self, shared: SharedRun, codes: dict[int, torch.Tensor], label_sets: dict[int, list[int]],
                 search: dict):
        self.shared, self.codes, self.label_sets, self.search = shared, codes, label_sets, search
        self.decoders = {k: GeneratedDecoders(shared.final(k).hyper, code) for k, code in codes.items()}

    @classmethod
    def search_codes(cls, shared: SharedRun, clients: list[dict], labels_of: np.ndarray, images: torch.Tensor, a,
                     seed: int, label_sets: dict[int, list[int]], anchor_weight: float) -> "HyperView":
        codes, search = {}, {}
        for c in clients:
            k = c["client"]
            game = membership_game(c, a.members_per_client, seed, labels_of)
            final = shared.final(k)
            anchor = code_anchor(seed_of(shared), k, final.spec["code_dim"])
            ids = game.ids if len(game.ids) else np.asarray(c["train_ids"][:a.members_per_client], np.int64)
            codes[k] = search_code(final.hyper, anchor, images[ids], labels_of[ids], seeded_generator(seed, CODE_SEARCH, k),
                                   lam=a.latent_fit_lambda, init=a.latent_fit_init, steps=a.latent_fit_steps,
                                   anchor_weight=anchor_weight)
            search[str(k)] = {"round": final.round, "records": int(len(ids)),
                              "distance_from_anchor": float((codes[k] - anchor).norm())}
        return cls(shared, codes, label_sets, search)

    def rule_labels(self, client: int, ids) -> np.ndarray:
        """The labels training gave a client's cross-domain records: its label set at (record id mod size)."""
        own = np.asarray(self.label_sets[client])
        return own[np.asarray(ids, np.int64) % len(own)]

    def score(self, client: int, make_attack, records: torch.Tensor, labels: np.ndarray,
              generator: torch.Generator) -> np.ndarray:
        return score_by_class(make_attack, self.decoders[client], records, labels, generator)

    def fit(self, client: int, records: torch.Tensor, labels: np.ndarray, generator: torch.Generator, **options):
        return fit_by_class(self.decoders[client], records, labels, generator, **options)

    def update_alignment(self, client: int, records: torch.Tensor, labels: np.ndarray, a, seed: int) -> np.ndarray:
        rounds = [d for _, d in sorted(self.shared.decoders[client].items())]
        return update_alignment(rounds, self.codes[client], records, labels, seeded_generator(seed, ALIGNMENT, client),
                                lam=a.latent_fit_lambda, init=a.latent_fit_init, steps=a.latent_fit_steps)

    def lipschitz(self, client: int, member_ids: np.ndarray, images: torch.Tensor, labels_of: np.ndarray, a,
                  seed: int, rounds: list[int]) -> dict:
        """The bracket of every decoder the trained hypernetwork of each of ``rounds`` (the last included)
        generates at the searched code, for the client's classes; per round the largest lower and upper bounds
        over them."""
        per_round = {}
        for rnd in rounds:
            decoders = GeneratedDecoders(self.shared.decoders[client][rnd].hyper, self.codes[client])
            per_class = {}
            for y in self.label_sets[client]:
                ids = member_ids[labels_of[member_ids] == y]
                latents = None
                if len(ids):
                    latents = fit_by_class(decoders, images[ids], labels_of[ids], seeded_generator(seed, 74, client, rnd),
                                           lam=a.latent_fit_lambda, init=a.latent_fit_init, restarts=1,
                                           steps=a.latent_fit_steps, precision=a.latent_fit_precision).latents
                per_class[str(y)] = lipschitz_bracket(decoders(y), decoders.latent_dim, candidate_latents=latents,
                                                      n_prior=a.lipschitz_prior_points,
                                                      ascent_steps=a.lipschitz_ascent_steps, seed=seed)
            per_round[str(rnd)] = {"lower": max(b["lower"] for b in per_class.values()),
                                   "upper": max(b["upper"] for b in per_class.values()),
                                   "reference_grad_sum_max": max(b["reference_grad_sum_max"] for b in per_class.values()),
                                   "classes": per_class}
        final = per_round[str(max(self.shared.decoders[client]))]
        return {"lower": final["lower"], "upper": final["upper"],
                "reference_grad_sum_max": final["reference_grad_sum_max"], "rounds": per_round,
                "generated_at": "the code the audit searched (code_search), one decoder per class of the client"}


def seed_of(shared: SharedRun) -> int:
    """The run's seed, from its partition record (the anchors derive from it; they are public)."""
    return int(shared.partition["seed"])
