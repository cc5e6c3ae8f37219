"""FedHypeVAE (arXiv 2601.00785), built from its abstract: a shared hypernetwork generates each client's
conditional decoder and class prior from a private client code; clients share only hypernetwork updates.

Design (the abstract leaves these open; each is a setting with the default given):

- **Model.** Each client trains a conditional VAE on pixels, the label as the condition. Its encoder
  q(z | x, y) (an MLP on [x, onehot(y)], the model spec's widths) and its code c (``strategy.code_dim``
  = 8 numbers) are private: they are never sent, in any round. Its decoder p(x | z, y) and its prior
  N(m_y(c), I) are not trained directly: the shared hypernetwork generates them from c
  (``federation.hypernetwork``). Every decoder weight depends on c through a FiLM-style generation,
  W_l(c) = diag(1 + gamma_l(c)) Wbar_l, b_l(c) = (1 + gamma_l(c)) bbar_l + beta_l(c), with gamma, beta and
  the prior means read off a tanh trunk of width ``strategy.hyper_hidden`` (= 64). Generating the full
  matrices from c would multiply the hypernetwork by the code size; this keeps it at one decoder plus a
  head (789k parameters for the paper's 2-128-256-512-784 decoder, 3.2 MB per message), so paper-scale
  runs fit 2 CPU cores.
- **A round.** The server sends the hypernetwork theta (downlink ``hypernetwork``). Each selected client
  generates its decoder and prior, trains its code, encoder and theta for ``training.local_epochs`` epochs
  (a fresh Adam for theta each round; the code's and encoder's Adam persists), and sends back **only**
  theta_trained - theta_received (uplink ``hypernetwork_update``; an upload with anything else, an extra
  artifact or another tensor, is rejected before use). The server adds the sample-weighted mean of the
  updates to theta (FedAvg on the hypernetwork; a late update is dropped or down-weighted by the stale
  policy).
- **Regularizers.** ``strategy.mmd_weight`` (= 10) times a class-conditional MMD^2 between the real batch
  and ``strategy.mmd_samples`` (= 64) records the client's generated decoder synthesizes, with a Gaussian
  kernel of bandwidth ``strategy.mmd_bandwidth`` (= 10, the median pixel distance between MNIST training
  images) approximated by ``strategy.mmd_frequencies`` (= 64) random Fourier frequencies (``federation.mmd``).
  ``strategy.lipschitz_weight`` (= 0.01) times ||d(generated decoder weights, biases, prior means)/dc||_F^2,
  the squared Frobenius norm of the hypernetwork's Jacobian with respect to the code, exact, at the
  client's code and at a random point between the meta-code and it: it keeps the generated decoders from
  changing fast with the code, on the path meta-code synthesis uses. ``strategy.anchor_weight`` (= 1)
  times ||c - a_k||^2 keeps the code near its anchor.
- **Meta-codes.** The server never sees a code, so it cannot average them. Client k's code starts at a
  public anchor a_k, a random unit vector derived from the run's seed, and is pulled back towards it. The
  **neutral meta-code** is the origin, at distance 1 from every anchor: it favours no client, and the
  server forms it without any private input. The **meta-codes** of the mixture are the anchors, one per
  domain (client); a mixture (``server.synthesis: mixture``, ``server.mixture_weights``: one non-negative
  weight per client, summing to 1; default uniform) draws share w_k of the round's records from a_k,
  spread evenly over client k's (public) label set. Synthesis is class-conditional, z ~ N(m_y(code), I),
  ``server.samples_per_class`` (= 300) times the number of classes in all (meta-code: that many of every
  class). Every round, the server trains a global VAE on them (as ALIGN-FL's server does on
  decoded samples); the paper probe, domain-CNN FID and TSTR are computed from it and from them exactly as
  for ALIGN-FL (TSTR labels class y's samples with the client holding y).
- **DP.** ``privacy.mechanism: dp-sgd`` trains with record-level DP-SGD (``federation.privacy.dp_hyper``):
  every record's gradient with respect to **everything the client trains on records**, code, encoder and
  hypernetwork jointly, is clipped (book-keeping clipping: exact per-record gradients), its MMD feature
  is released with it, and one Gaussian noise covers both; each round is one ledger event (q, sigma,
  steps), accounted by the same four accountants. The epsilon covers what is shared, the sequence of
  hypernetwork updates, because each update is computed from released (noisy) values only. That needs
  the code and encoder inside the mechanism: they never leave the client, but they shape every record's
  hypernetwork gradient, and trained without noise they would carry each record's influence into the
  update past the clip bound (the failure of ALIGN-FL's ``scope: decoder``). So ``privacy.scope`` must be
  ``full``. ``privacy.mechanism: none`` is the No-DP switch. The record count and the label set of each
  client are treated as public (the sampling rate and the synthetic labels use them).
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from federation.client import ClientSetup
from federation.errors import ConfigError, UploadRejected
from federation.hyper_client import HyperClient, HyperRecipe
from federation.hypernetwork import (HYPERNETWORK_KIND, UPDATE_KIND, FiLMHypernetwork, code_anchor,
                                     normalize_hyper_spec, synthesize)
from federation.messages import ClientReport, Downlink, Payload, Uplink
from federation.rng import SERVER_INIT, seeded_generator
from federation.server import AlignFLServer
from federation.strategies.base import (Aggregate, ClientHandler, FederationSettings, Strategy, select_clients,
                                        staleness_weight)

SYNTHESIS = ("meta-code", "mixture")
HYPER_INIT = 1  # the hypernetwork's init stream: (seed, SERVER_INIT, HYPER_INIT); the global VAE uses (seed, SERVER_INIT)


@dataclass
class FedHypeVAESettings:
    name: str = "fedhypevae"
    code_dim: int = 8  # size of each client's private code
    hyper_hidden: int = 64  # width of the hypernetwork's trunk
    mmd_weight: float = 10.0
    mmd_frequencies: int = 64  # random Fourier frequencies of the MMD kernel
    mmd_bandwidth: float = 10.0  # Gaussian kernel bandwidth, in pixel-space distance
    mmd_samples: int = 64  # synthetic records per step for the MMD term
    lipschitz_weight: float = 0.01
    anchor_weight: float = 1.0


@dataclass
class FedHypeVAEServerSettings(FederationSettings):
    stale_policy: str = "drop"  # a late update is applied once (weighted) or dropped, as FedAvg's
    synthesis: str = "meta-code"  # meta-code | mixture
    mixture_weights: typing.Optional[list] = None  # one weight per client (mixture only); default uniform
    samples_per_class: int = 300  # synthetic records per class per round, for the global VAE and TSTR
    epochs: int = 5  # global-VAE epochs per round
    model: typing.Optional[dict] = None  # the global VAE's spec; default: the clients' model


def hyper_spec(settings: FedHypeVAESettings, model_spec: dict) -> dict:
    return normalize_hyper_spec({"latent_dim": model_spec["latent_dim"], "hidden": model_spec["hidden"],
                                 "code_dim": settings.code_dim, "hyper_hidden": settings.hyper_hidden})


def mixture_counts(weights: list[float], n: int) -> list[int]:
    """n split by ``weights``: floors, then the largest remainders (ties to the lower index)."""
    raw = [w * n for w in weights]
    counts = [int(r) for r in raw]
    for j in sorted(range(len(raw)), key=lambda j: (counts[j] - raw[j], j))[:n - sum(counts)]:
        counts[j] += 1
    return counts


class FedHypeVAEClient(ClientHandler):
    downlink_kinds = (HYPERNETWORK_KIND,)

    def __init__(self, settings: FedHypeVAESettings):
        self.settings = settings

    def recipe(self, setup: ClientSetup) -> HyperRecipe:
        s = self.settings
        return HyperRecipe(hyper_spec(s, setup.spec), s.mmd_weight, s.mmd_frequencies, s.mmd_bandwidth,
                           s.mmd_samples, s.lipschitz_weight, s.anchor_weight)

    def make_client(self, setup: ClientSetup, state: dict | None, rnd: int) -> HyperClient:
        return HyperClient(setup, state, rnd, self.recipe(setup))

    def check_downlink(self, setup: ClientSetup, downlink: Downlink) -> None:
        own = hyper_spec(self.settings, setup.spec)
        if downlink.payload.spec != own:
            raise UploadRejected(f"the hypernetwork sent is {downlink.payload.spec}, this client trains {own}")

    def handle(self, client: HyperClient, downlink: Downlink) -> Uplink:
        client.receive(downlink.payload.tensors)
        loss, events = client.train_round()
        n = client.setup.num_samples
        if loss is None:  # budget spent: nothing new leaves the client
            return Uplink(client.id, downlink.round, Payload("empty"), n, ClientReport("budget-exhausted", None, events))
        report = ClientReport("trained", None if client.dp is not None else loss, events)
        return Uplink(client.id, downlink.round, client.update_payload(), n, report)


class FedHypeVAE(Strategy):
    name = "fedhypevae"
    Settings = FedHypeVAESettings
    ServerSettings = FedHypeVAEServerSettings
    uplink_kinds = (UPDATE_KIND, "empty")
    downlink_kinds = (HYPERNETWORK_KIND,)
    stale_policies = ("drop", "weight")  # each update is applied once, to the hypernetwork of its arrival round
    privacy_mechanisms = ("none", "dp-sgd")
    same_architecture = True
    precisions = ("fp32",)  # the hypernetwork's trainers run in float32 only

    def __init__(self, settings: FedHypeVAESettings, server: FedHypeVAEServerSettings, ctx):
        super().__init__(settings, server, ctx)
        self.spec = hyper_spec(settings, ctx.client_specs[ctx.client_ids[0]])
        self.hyper = FiLMHypernetwork(self.spec, seeded_generator(ctx.seed, SERVER_INIT, HYPER_INIT))
        self.server = AlignFLServer(ctx.server_spec, ctx.training, ctx.seed)  # its global VAE and optimizer
        self.classes = sorted({c for cs in ctx.label_sets.values() for c in cs})
        self.last_synthetic: tuple[torch.Tensor, torch.Tensor] | None = None
        self.updates_used = 0

    # ------------------------------------------------------------------ settings
    @classmethod
    def check(cls, settings: FedHypeVAESettings, server: FedHypeVAEServerSettings, n_clients: int) -> None:
        super().check(settings, server, n_clients)
        for key in ("code_dim", "hyper_hidden", "mmd_frequencies", "mmd_samples"):
            if getattr(settings, key) <= 0:
                raise ConfigError(f"strategy.{key} must be > 0, got {getattr(settings, key)}")
        for key in ("mmd_weight", "lipschitz_weight", "anchor_weight"):
            if not getattr(settings, key) >= 0:
                raise ConfigError(f"strategy.{key} must be >= 0, got {getattr(settings, key)}")
        if not settings.mmd_bandwidth > 0:
            raise ConfigError(f"strategy.mmd_bandwidth must be > 0, got {settings.mmd_bandwidth}")
        for key in ("samples_per_class", "epochs"):
            if getattr(server, key) <= 0:
                raise ConfigError(f"server.{key} must be > 0, got {getattr(server, key)}")
        if server.synthesis not in SYNTHESIS:
            raise ConfigError(f"server.synthesis must be one of {list(SYNTHESIS)}, not {server.synthesis!r}")
        if server.mixture_weights is not None:
            check_mixture(server.mixture_weights, n_clients, server.synthesis)

    @classmethod
    def check_setup(cls, settings, specs: list[dict], privacy) -> None:
        if any(s["arch"] != "mlp" or s["spectral_norm"] for s in specs):
            raise ConfigError("fedhypevae generates an MLP decoder: model.arch must be mlp, without spectral_norm")
        if privacy.is_dp and privacy.scope != "full":
            raise ConfigError("privacy.scope must be full for fedhypevae: the private code and encoder shape every "
                              "record's hypernetwork gradient, so DP-SGD must cover them too")
        if privacy.is_dp and privacy.grad_sample_mode not in ("auto", "bk"):
            raise ConfigError(f"privacy.grad_sample_mode {privacy.grad_sample_mode!r} is not available for "
                              "fedhypevae, whose DP-SGD uses book-keeping clipping (auto or bk)")

    @classmethod
    def client_handler(cls, settings, server) -> FedHypeVAEClient:
        return FedHypeVAEClient(settings)

    @property
    def shared_artifacts(self) -> list[str]:
        return [UPDATE_KIND, "hypernetwork_spec", f"{HYPERNETWORK_KIND} (downlink)"]

    # ------------------------------------------------------------------ the protocol
    def configure_round(self, rnd: int, available: list[int]) -> dict[int, Downlink]:
        selected = select_clients(self.ctx.seed, rnd, available, self.server_settings.participation)
        if not selected:
            return {}
        down = Downlink(rnd, tuple(selected), Payload(HYPERNETWORK_KIND, dict(self.spec),
                                                      {k: v.detach().clone() for k, v in self.hyper.state_dict().items()}))
        return {c: down for c in selected}

    def check_uplink(self, uplink: Uplink) -> None:
        if uplink.kind == UPDATE_KIND and uplink.spec != self.spec:
            raise UploadRejected(f"client {uplink.client}'s update is for the hypernetwork {uplink.spec}, "
                                 f"not the one the server holds ({self.spec})")

    def aggregate_round(self, rnd: int, replies: list[Uplink]) -> Aggregate:
        weights, used = {}, {}
        for up in replies:
            if up.kind != UPDATE_KIND:
                continue
            w = staleness_weight(self.server_settings, rnd - up.round)
            used[up.client] = w
            if w > 0:
                weights[up.client] = (up, w * up.num_samples)
        if not weights:
            return Aggregate(None, used)
        total = sum(w for _, w in weights.values())
        with torch.no_grad():
            for name, tensor in self.hyper.state_dict().items():
                tensor += sum(up.tensors[name].double() * (w / total) for up, w in weights.values()).to(tensor.dtype)
        self.updates_used += len(weights)
        generator = self.server.round_generator(rnd)
        x, y = self.synthesize(self.server_settings.samples_per_class, generator)
        loss = self.server.train_global(x, self.server_settings.epochs, generator)
        self.last_synthetic = (x, y)
        return Aggregate(loss, used)

    # ------------------------------------------------------------------ synthesis
    def synthesis_plan(self, per_class: int) -> tuple[torch.Tensor, list[list[int]]]:
        """(codes, counts[code][class]) of a round's synthesis, ``per_class`` x the number of classes in all.
        Meta-code: every class from the neutral meta-code (the origin). Mixture: meta-code k (client k's public
        anchor) draws the weight's share of the total, spread evenly over client k's label set (its domain)."""
        s = self.server_settings
        total = per_class * len(self.classes)
        if s.synthesis == "meta-code":
            return torch.zeros(1, self.spec["code_dim"]), [[per_class] * len(self.classes)]
        ids = self.ctx.client_ids
        weights = s.mixture_weights if s.mixture_weights is not None else [1.0 / len(ids)] * len(ids)
        counts = []
        for k, share in zip(ids, mixture_counts([float(w) for w in weights], total)):
            own = self.ctx.label_sets[k]
            spread = dict(zip(own, mixture_counts([1.0 / len(own)] * len(own), share)))
            counts.append([spread.get(c, 0) for c in self.classes])
        anchors = torch.stack([code_anchor(self.ctx.seed, k, self.spec["code_dim"]) for k in ids])
        return anchors, counts

    def synthesize(self, per_class: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, class labels) of a round's synthesis (``synthesis_plan``)."""
        codes, counts = self.synthesis_plan(per_class)
        return synthesize(self.hyper, codes, counts, self.classes, generator)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"hyper": {k: v.clone() for k, v in self.hyper.state_dict().items()},
                "server": self.server.state_dict(), "updates_used": self.updates_used,
                "last_synthetic": list(self.last_synthetic) if self.last_synthetic is not None else None}

    def load_state_dict(self, state: dict, shared_root: Path) -> None:
        self.hyper.load_state_dict(state["hyper"])
        self.server.load_state_dict(state["server"], shared_root)
        self.updates_used = int(state["updates_used"])
        self.last_synthetic = tuple(state["last_synthetic"]) if state["last_synthetic"] is not None else None

    # ------------------------------------------------------------------ what the metrics evaluate
    @property
    def global_vae(self):
        return self.server.vae

    def synthetic_set(self):
        """The last round's synthetic records, labelled by the client whose label set holds their class; None
        when a class belongs to several clients (a Dirichlet partition), where that label has no meaning."""
        if self.last_synthetic is None:
            return None
        owners: dict[int, list[int]] = {}
        for k, classes in self.ctx.label_sets.items():
            for c in classes:
                owners.setdefault(c, []).append(k)
        if any(len(v) > 1 for v in owners.values()):
            return None
        x, y = self.last_synthetic
        return x, torch.tensor([owners[int(c)][0] for c in y], dtype=torch.long)


def check_mixture(weights, n_clients: int, synthesis: str) -> None:
    """Mixture weights: one non-negative number per client, summing to 1; only for mixture synthesis."""
    if synthesis != "mixture":
        raise ConfigError("server.mixture_weights applies only with server.synthesis: mixture")
    if not isinstance(weights, list) or len(weights) != n_clients or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        raise ConfigError(f"server.mixture_weights must list one number per client ({n_clients}), got {weights!r}")
    if any(not w >= 0 for w in weights):
        raise ConfigError(f"server.mixture_weights must be non-negative, got {weights}")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ConfigError(f"server.mixture_weights must sum to 1, got {weights} (sum {sum(weights):.6g})")
