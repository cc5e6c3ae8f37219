"""A federated client: its private setup, its state between messages, and one round of local training.

A client is rebuilt for every message from its setup (id, private records, model spec, recipe,
privacy plan) and its saved state (``Client.state_dict``: the VAE, the optimizers, the DP trainer's
clip bound, its own DP events, whether its budget is spent). Its random streams are derived from
(seed, client, round), so a client rebuilt in a fresh process, or run in any order beside other
clients, trains exactly as a long-lived one would. Both engines go through this same path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from federation.latent_gmm import ARTIFACT, fit_latent_gmm
from federation.messages import Payload
from federation.models import VAE
from federation.precision import adam
from federation.privacy.budget import round_would_overrun
from federation.privacy.dp_sgd import DPPlan, DPTrainer
from federation.privacy.ledger import DPEvent
from federation.privacy.spec import PrivacySpec
from federation.rng import CLIENT_DP_NOISE, CLIENT_INIT, CLIENT_TRAIN, LATENT_GMM, int_seed, seeded_generator
from federation.training import TrainSettings, encode_mu, train_epochs

STATE_FORMAT = "alignfl-client-state/1"


@dataclass
class ClientSetup:
    """What a client knows before its first message. ``data`` never leaves the client."""

    client: int
    data: torch.Tensor
    spec: dict
    settings: TrainSettings
    seed: int
    privacy: PrivacySpec
    dp_plan: DPPlan | None = None
    # the seed of the client's training randomness (batch sampling, reparameterization and DP noise).
    # None: derived from the run's seed, so that a run repeats exactly (a simulation: whoever knows the
    # seed can recompute the noise). A real client node sets a secret of its own (node config
    # noise-secret), which the epsilon of DP-SGD assumes.
    noise_secret: int | None = None
    # each record's label (a strategy that conditions on it, FedHypeVAE, trains on it; ALIGN-FL does not), and
    # the client's label set from the partition config (public, like its record count)
    labels: torch.Tensor | None = None
    label_set: list[int] | None = None

    @property
    def noise_seed(self) -> int:
        return self.seed if self.noise_secret is None else self.noise_secret

    @property
    def noise_source(self) -> str:
        return ("derived from the run's seed (reproducible; anyone who knows the seed can recompute it)"
                if self.noise_secret is None else "a secret of the client's node")

    @property
    def num_samples(self) -> int:
        return len(self.data)


class Client:
    """One client, as it stands at the start of round ``rnd``."""

    def __init__(self, setup: ClientSetup, state: dict | None, rnd: int):
        self.setup = setup
        self.id = setup.client
        self.round = rnd
        s = setup.settings
        self.vae = VAE(setup.spec, seeded_generator(setup.seed, CLIENT_INIT, self.id) if state is None else None)
        self.optimizer = adam(self.vae.parameters(), s.lr)
        self.generator = seeded_generator(setup.noise_seed, CLIENT_TRAIN, self.id, rnd)
        self.events: list[DPEvent] = []
        self.budget_exhausted = False
        self.dp: DPTrainer | None = None
        if setup.privacy.is_dp:
            self.dp = DPTrainer(self.vae, setup.privacy, setup.dp_plan, s.lr, s.lambda_kl, setup.num_samples,
                                self.generator, seeded_generator(setup.noise_seed, CLIENT_DP_NOISE, self.id, rnd),
                                precision=s.precision)
        if state is not None:
            self.load_state_dict(state)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Tensors and plain values only (a checkpoint or a Flower record can hold it)."""
        def copy(obj):
            if isinstance(obj, torch.Tensor):
                return obj.detach().clone()
            if isinstance(obj, dict):
                return {k: copy(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return type(obj)(copy(v) for v in obj)
            return obj

        return copy({"format": STATE_FORMAT, "round": self.round, "vae": self.vae.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "dp": self.dp.state_dict() if self.dp is not None else None,
                     "events": [vars(e).copy() for e in self.events], "budget_exhausted": self.budget_exhausted})

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"client state is not {STATE_FORMAT}")
        self.vae.load_state_dict(state["vae"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.dp is not None:
            self.dp.load_state_dict(state["dp"])
        self.events = [DPEvent(**e) for e in state["events"]]
        self.budget_exhausted = bool(state["budget_exhausted"])

    # ------------------------------------------------------------------------------ training
    def reset_optimizer(self) -> None:
        """A fresh optimizer over the current weights (FedAvg's clients start each round anew)."""
        self.optimizer = adam(self.vae.parameters(), self.setup.settings.lr)

    def train_round(self, prox_mu: float = 0.0, prox_ref: dict | None = None) -> tuple[float | None, list[DPEvent]]:
        """One round of local training: (the last epoch's mean loss, the client's DP events so far). Every
        report carries the client's whole DP history, so a reply that is lost on the way loses no
        accounting: the next one repeats it (the ledger keeps one event per client and round). The loss
        is None when the client's DP budget would be overrun: it then trains no more."""
        if self.dp is not None:
            return self._train_round_dp()
        s, privacy = self.setup.settings, self.setup.privacy
        lcd = privacy.lcd_lambda if privacy.mechanism == "lcd" else 0.0
        loss = train_epochs(self.vae, self.optimizer, self.setup.data, s.local_epochs, s.batch_size, s.lambda_kl,
                            self.generator, prox_mu, prox_ref, lcd_lambda=lcd, precision=s.precision)
        return loss, []

    def _train_round_dp(self) -> tuple[float | None, list[DPEvent]]:
        plan, privacy = self.dp.plan, self.setup.privacy
        if self.budget_exhausted or round_would_overrun(privacy, self.events, plan, self.setup.settings.local_epochs):
            self.budget_exhausted = True
            return None, list(self.events)
        start = self.dp.clip_bound
        loss, steps = self.dp.train_epochs(self.setup.data, self.setup.settings.local_epochs)
        event = DPEvent(self.id, self.round, plan.sample_rate, plan.noise_multiplier, steps, privacy.clipping,
                        privacy.scope, self.dp.mode, start, self.dp.clip_bound)
        self.events.append(event)
        return loss, list(self.events)

    # ------------------------------------------------------------------------------ what can leave
    def decoder_payload(self, gmm_components: int = 0) -> Payload:
        """ALIGN-FL's uplink: the decoder and its spec (plus a latent GMM only when configured)."""
        extras = {}
        if gmm_components:
            seed = int_seed(seeded_generator(self.setup.seed, LATENT_GMM, self.id, self.round))
            extras[ARTIFACT] = fit_latent_gmm(encode_mu(self.vae, self.setup.data), gmm_components, seed=seed)
        return Payload("decoder", dict(self.vae.spec), dict(self.vae.decoder.state_dict()), extras)

    def vae_payload(self) -> Payload:
        """FedAvg/FedProx's uplink: the whole VAE."""
        return Payload("vae", dict(self.vae.spec), dict(self.vae.state_dict()))

    def load_global(self, state: dict[str, torch.Tensor]) -> None:
        self.vae.load_state_dict(state)
