"""A FedHypeVAE client: its private code and conditional encoder, the hypernetwork it was sent, and one
round of local training (with or without DP-SGD).

The client's loss on a batch is the conditional VAE's (per record: summed squared error + lambda_kl * KL
of q(z | x, y) from the class prior N(m_y(c), I), averaged over latent dims, as the ALIGN-FL VAE's), plus
three terms of its state:

- ``mmd_weight`` * MMD^2 between the real batch and ``mmd_samples`` synthetic records decoded from the
  client's own code (labels drawn uniformly from the client's label set, z from the class prior);
- ``lipschitz_weight`` * ||d generated decoder / d code||_F^2, at the client's code and at a random point
  between the neutral meta-code (the origin) and it (``FiLMHypernetwork.jacobian_sq_norm``);
- ``anchor_weight`` * ||c - a_k||^2, which keeps the code near its public anchor a_k.

Between rounds the client keeps its code, encoder, their Adam moments, its clip bound and its DP events
(``state_dict``: tensors and plain values, so a Flower node can keep it as safetensors bytes). The
hypernetwork comes with every downlink; its optimizer starts anew each round, and what leaves the client
is only the difference between the hypernetwork it trained and the one it was sent.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from federation.client import ClientSetup
from federation.hypernetwork import UPDATE_KIND, FiLMHypernetwork, code_anchor, onehot
from federation.messages import Payload
from federation.mmd import RandomFeatures, mmd_squared
from federation.models import PIXELS, MLPEncoder, _materialize, reparameterization_noise
from federation.precision import adam
from federation.privacy.budget import round_would_overrun
from federation.privacy.dp_hyper import HyperDPStep
from federation.privacy.ledger import DPEvent
from federation.rng import CLIENT_DP_NOISE, CLIENT_INIT, CLIENT_TRAIN, MMD_FEATURES, seeded_generator

STATE_FORMAT = "alignfl-hyper-client-state/1"


@dataclass
class HyperRecipe:
    """What a FedHypeVAE client trains with besides the common recipe (from the strategy's settings)."""

    spec: dict  # the hypernetwork's
    mmd_weight: float
    mmd_frequencies: int
    mmd_bandwidth: float
    mmd_samples: int
    lipschitz_weight: float
    anchor_weight: float


class ConditionalEncoder(MLPEncoder):
    """q(z | x, y): the MLP encoder on [x, onehot(y)], with the model spec's hidden widths."""

    def __init__(self, hidden: list[int], latent_dim: int, num_classes: int):
        super().__init__(hidden, latent_dim, PIXELS + num_classes)

    def forward(self, x: torch.Tensor, y1h: torch.Tensor):
        return super().forward(torch.cat([x.flatten(1), y1h], 1))


class HyperCVAE(nn.Module):
    """A client's whole trainable model: its code (a bias-free Linear on a constant 1, so that book-keeping
    clipping sees it), its encoder, and the hypernetwork it was sent."""

    def __init__(self, spec: dict, generator: torch.Generator | None = None):
        super().__init__()
        with torch.device("meta"):
            self.code = nn.Linear(1, spec["code_dim"], bias=False)
            self.encoder = ConditionalEncoder(spec["hidden"], spec["latent_dim"], spec["num_classes"])
        _materialize(self, generator)
        self.hyper = FiLMHypernetwork(spec)

    @property
    def code_vector(self) -> torch.Tensor:
        return self.code.weight[:, 0]

    def per_sample_loss(self, x: torch.Tensor, y1h: torch.Tensor, lambda_kl: float,
                        generator: torch.Generator) -> torch.Tensor:
        codes = self.code(x.new_ones(len(x), 1))  # the same code in every row: one copy per record
        gains, shifts, means = self.hyper.generate(codes)
        mu, logvar = self.encoder(x, y1h)
        z = mu + reparameterization_noise(mu, generator) * torch.exp(0.5 * logvar)
        recon = self.hyper.decode(z, y1h, gains, shifts)
        prior_mean = (means * y1h.unsqueeze(2)).sum(1)
        mse = ((recon - x) ** 2).flatten(1).sum(1)
        kl = 0.5 * (logvar.exp() + (mu - prior_mean) ** 2 - 1 - logvar).mean(1)
        return mse + lambda_kl * kl


class HyperClient:
    """One FedHypeVAE client, as it stands at the start of round ``rnd``."""

    def __init__(self, setup: ClientSetup, state: dict | None, rnd: int, recipe: HyperRecipe):
        self.setup, self.recipe = setup, recipe
        self.id, self.round = setup.client, rnd
        spec = recipe.spec
        self.model = HyperCVAE(spec, seeded_generator(setup.seed, CLIENT_INIT, self.id))
        self.anchor = code_anchor(setup.seed, self.id, spec["code_dim"])
        with torch.no_grad():
            self.model.code.weight.copy_(self.anchor.view(-1, 1))
        s = setup.settings
        self.private_params = [self.model.code.weight, *self.model.encoder.parameters()]
        self.optimizer = adam(self.private_params, s.lr)
        self.generator = seeded_generator(setup.noise_seed, CLIENT_TRAIN, self.id, rnd)
        self.onehot = onehot(setup.labels, spec["num_classes"])
        self.label_set = torch.as_tensor(setup.label_set, dtype=torch.long)
        self.features = None
        if recipe.mmd_weight > 0:
            self.features = RandomFeatures(recipe.mmd_frequencies, recipe.mmd_bandwidth, spec["num_classes"],
                                           seeded_generator(setup.seed, MMD_FEATURES, self.id))
        self.events: list[DPEvent] = []
        self.budget_exhausted = False
        self.dp: HyperDPStep | None = None
        if setup.privacy.is_dp:
            self.dp = HyperDPStep(self.model, setup.privacy, setup.dp_plan, setup.num_samples,
                                  seeded_generator(setup.noise_seed, CLIENT_DP_NOISE, self.id, rnd), self.features)
        self.received: dict[str, torch.Tensor] | None = None
        if state is not None:
            self.load_state_dict(state)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """What the client keeps between rounds: never the hypernetwork, which the server sends."""
        def copy(module):
            return {k: v.detach().clone() for k, v in module.state_dict().items()}

        return {"format": STATE_FORMAT, "round": self.round, "code": copy(self.model.code),
                "encoder": copy(self.model.encoder),
                "optimizer": self.optimizer.state_dict(),
                "clip_bound": self.dp.clip_bound if self.dp is not None else None,
                "events": [vars(e).copy() for e in self.events], "budget_exhausted": self.budget_exhausted}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"client state is not {STATE_FORMAT}")
        self.model.code.load_state_dict(state["code"])
        self.model.encoder.load_state_dict(state["encoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.dp is not None:
            self.dp.load_clip_bound(state["clip_bound"])
        self.events = [DPEvent(**e) for e in state["events"]]
        self.budget_exhausted = bool(state["budget_exhausted"])

    # ------------------------------------------------------------------------------ a round
    def receive(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.hyper.load_state_dict(tensors)
        self.received = {k: v.detach().clone() for k, v in self.model.hyper.state_dict().items()}

    def train_round(self) -> tuple[float | None, list[DPEvent]]:
        """(the last epoch's mean loss, the client's DP events so far); the loss is None when the DP budget
        would be overrun (nothing is trained, nothing new is shared)."""
        s, privacy = self.setup.settings, self.setup.privacy
        if self.dp is not None and (self.budget_exhausted or round_would_overrun(
                privacy, self.events, self.dp.plan, s.local_epochs)):
            self.budget_exhausted = True
            return None, list(self.events)
        hyper_optimizer = adam(self.model.hyper.parameters(), s.lr)
        self.model.train()
        if self.dp is None:
            return self._train_plain(hyper_optimizer), []
        start = self.dp.clip_bound
        steps, last = 0, 0.0
        for batches in self.dp.batches(self.setup.num_samples, s.local_epochs, self.generator):
            losses = []
            for idx in batches:
                loss, embedding = self.dp.release(self.setup.data[idx], self.onehot[idx], self._per_sample_loss)
                self._regularize(embedding, add=True)
                self._step(hyper_optimizer)
                steps += 1
                if loss == loss:
                    losses.append(loss)
            last = sum(losses) / max(len(losses), 1)
        p = self.dp.plan
        self.events.append(DPEvent(self.id, self.round, p.sample_rate, p.noise_multiplier, steps, privacy.clipping,
                                   privacy.scope, self.dp.mode, start, self.dp.clip_bound))
        return last, list(self.events)

    def _per_sample_loss(self, x: torch.Tensor, y1h: torch.Tensor) -> torch.Tensor:
        return self.model.per_sample_loss(x, y1h, self.setup.settings.lambda_kl, self.generator)

    def _train_plain(self, hyper_optimizer) -> float:
        s, n = self.setup.settings, self.setup.num_samples
        last = 0.0
        for _ in range(s.local_epochs):
            order = torch.randperm(n, generator=self.generator)
            total, batches = 0.0, 0
            for start in range(0, n, s.batch_size):
                idx = order[start:start + s.batch_size]
                x, y1h = self.setup.data[idx], self.onehot[idx]
                loss = self._per_sample_loss(x, y1h).mean()
                embedding = self.features(x, y1h).mean(0) if self.features is not None else None
                loss = loss + self._regularize(embedding, add=False)
                loss.backward()
                self._step(hyper_optimizer)
                total += float(loss.detach())
                batches += 1
            last = total / max(batches, 1)
        return last

    def _regularize(self, real_embedding: torch.Tensor | None, add: bool) -> torch.Tensor:
        """The terms of the client's state (and of the real batch's embedding, given): their sum, or, with
        ``add``, their gradient added to what the parameters' ``.grad`` already hold."""
        r, model = self.recipe, self.model
        code = model.code_vector
        total = code.new_zeros(())
        if self.features is not None and r.mmd_weight > 0:
            m = r.mmd_samples
            labels = self.label_set[torch.randint(len(self.label_set), (m,), generator=self.generator)]
            y1h = onehot(labels, model.hyper.spec["num_classes"])
            gains, shifts, means = model.hyper.generate(code.view(1, -1))
            z = means[0, labels] + torch.randn(m, means.shape[2], generator=self.generator)
            synthetic = model.hyper.decode(z, y1h, gains, shifts)
            total = total + r.mmd_weight * mmd_squared(real_embedding.detach(), self.features(synthetic, y1h))
        if r.lipschitz_weight > 0:
            between = torch.rand((), generator=self.generator) * code  # between the meta-code (0) and the code
            total = total + r.lipschitz_weight * 0.5 * (model.hyper.jacobian_sq_norm(code)
                                                        + model.hyper.jacobian_sq_norm(between))
        if r.anchor_weight > 0:
            total = total + r.anchor_weight * (code - self.anchor).pow(2).sum()
        if add and total.requires_grad:
            params = [p for p in model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(total, params, allow_unused=True)
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad.add_(g)
        return total

    def _step(self, hyper_optimizer) -> None:
        self.optimizer.step()
        hyper_optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        hyper_optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------ what can leave
    def update_payload(self) -> Payload:
        """The only thing a FedHypeVAE client shares: its hypernetwork update (trained minus received)."""
        trained = self.model.hyper.state_dict()
        delta = {k: (trained[k] - self.received[k]).detach().clone() for k in self.received}
        return Payload(UPDATE_KIND, dict(self.model.hyper.spec), delta)
