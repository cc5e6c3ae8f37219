"""A stateful federated client: it keeps its whole VAE and optimizer across rounds."""
from __future__ import annotations

import torch

from federation.latent_gmm import ARTIFACT, fit_latent_gmm
from federation.messages import Upload
from federation.models import VAE
from federation.privacy.budget import spent_epsilon
from federation.privacy.dp_sgd import DPPlan, DPTrainer
from federation.privacy.ledger import DPEvent, PrivacyLedger
from federation.privacy.spec import PrivacySpec
from federation.training import TrainSettings, encode_mu, train_epochs


def seeded_generator(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class Client:
    def __init__(self, client_id: int, spec: dict, data: torch.Tensor, settings: TrainSettings, seed: int,
                 privacy: PrivacySpec | None = None, dp_plan: DPPlan | None = None,
                 ledger: PrivacyLedger | None = None):
        self.id = client_id
        self.data = data  # private: never leaves this object except through its decoder upload
        self.settings = settings
        self.seed = seed
        self.privacy = privacy or PrivacySpec()
        self.ledger = ledger
        self.round = 0
        self.budget_exhausted = False
        torch.manual_seed(int(seeded_generator(seed, 1, client_id).initial_seed()))
        self.vae = VAE(spec)
        self.optimizer = torch.optim.Adam(self.vae.parameters(), lr=settings.lr)
        self.generator = seeded_generator(seed, 2, client_id)
        self.dp: DPTrainer | None = None
        if self.privacy.is_dp:
            self.dp = DPTrainer(self.vae, self.privacy, dp_plan, settings.lr, settings.lambda_kl, len(data),
                                self.generator, seeded_generator(seed, 5, client_id))

    def train_round(self, prox_mu: float = 0.0, prox_ref: dict | None = None,
                    federation_round: int | None = None) -> float | None:
        """One round of local training; returns the last epoch's mean loss, or None when the client's
        DP budget would be overrun (it then trains no more). ``federation_round`` labels the DP events
        (a client that skipped rounds has trained fewer rounds than the federation has run)."""
        rnd = self.round if federation_round is None else federation_round
        self.round += 1
        if self.dp is not None:
            return self._train_round_dp(rnd)
        lcd = self.privacy.lcd_lambda if self.privacy.mechanism == "lcd" else 0.0
        return train_epochs(self.vae, self.optimizer, self.data, self.settings.local_epochs,
                            self.settings.batch_size, self.settings.lambda_kl, self.generator,
                            prox_mu, prox_ref, lcd_lambda=lcd)

    def _train_round_dp(self, rnd: int) -> float | None:
        plan = self.dp.plan
        planned = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_epoch * self.settings.local_epochs)
        target = self.privacy.target_epsilon
        if self.budget_exhausted or (target is not None and spent_epsilon(
                self.privacy, self.ledger.history(self.id) + [planned]) > target):
            self.budget_exhausted = True
            return None
        start = self.dp.clip_bound
        loss, steps = self.dp.train_epochs(self.data, self.settings.local_epochs)
        self.ledger.record(DPEvent(self.id, rnd, plan.sample_rate, plan.noise_multiplier, steps,
                                   self.privacy.clipping, self.privacy.scope, self.dp.mode,
                                   start, self.dp.clip_bound))
        return loss

    def state_dict(self) -> dict:
        return {"round": self.round, "budget_exhausted": self.budget_exhausted, "vae": self.vae.state_dict(),
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "dp": self.dp.state_dict() if self.dp is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.round, self.budget_exhausted = int(state["round"]), bool(state["budget_exhausted"])
        self.vae.load_state_dict(state["vae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        if self.dp is not None:
            self.dp.load_state_dict(state["dp"])

    def decoder_upload(self, rnd: int, gmm_components: int = 0) -> Upload:
        """ALIGN-FL's message: the decoder and its spec (plus a latent GMM only when configured)."""
        extras = {}
        if gmm_components:
            extras[ARTIFACT] = fit_latent_gmm(encode_mu(self.vae, self.data), gmm_components,
                                              seed=self.seed * 100 + self.id)
        state = {k: v.clone() for k, v in self.vae.decoder.state_dict().items()}
        return Upload(self.id, rnd, "decoder", dict(self.vae.spec), state, len(self.data), extras)

    def full_upload(self, rnd: int) -> Upload:
        """FedAvg/FedProx's message: the whole VAE."""
        state = {k: v.clone() for k, v in self.vae.state_dict().items()}
        return Upload(self.id, rnd, "vae", dict(self.vae.spec), state, len(self.data))

    def load_global(self, state: dict[str, torch.Tensor]) -> None:
        self.vae.load_state_dict(state)
