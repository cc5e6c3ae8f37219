"""The ALIGN-FL server: it keeps each client's last accepted decoder (and the round it was trained in),
decodes synthetic data from them, and trains a persistent global VAE on the union."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from federation.latent_gmm import ARTIFACT, sample_latent_gmm
from federation.messages import Uplink
from federation.models import VAE, load_decoder
from federation.precision import adam
from federation.rng import SERVER_INIT, SERVER_ROUND, seeded_generator
from federation.training import TrainSettings, decode, train_epochs


@dataclass
class HeldDecoder:
    decoder: torch.nn.Module
    upload: Uplink
    arrived: int  # the round its reply arrived in (its folder under shared/)

    @property
    def trained(self) -> int:
        return self.upload.round


class AlignFLServer:
    def __init__(self, spec: dict, settings: TrainSettings, seed: int, sampling: str = "prior"):
        self.seed = seed
        self.vae = VAE(spec, seeded_generator(seed, SERVER_INIT))
        self.optimizer = adam(self.vae.parameters(), settings.lr)
        self.settings = settings
        self.sampling = sampling
        self.decoders: dict[int, HeldDecoder] = {}

    def state_dict(self) -> dict:
        """The accepted decoders are recorded by (client, arrival round): a resumed server reads them
        back from the run's shared/ folder through the validated message path."""
        return {"vae": self.vae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "accepted": {str(cid): h.arrived for cid, h in self.decoders.items()}}

    def load_state_dict(self, state: dict, shared_root) -> None:
        from federation.messages import load_uplink

        self.vae.load_state_dict(state["vae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.decoders = {}
        for cid, rnd in sorted(state["accepted"].items(), key=lambda kv: int(kv[0])):
            self.accept(load_uplink(shared_root / f"round-{rnd}" / f"client-{cid}.safetensors"), rnd)

    def accept(self, upload: Uplink, arrived: int) -> None:
        if upload.kind != "decoder":
            raise ValueError(f"ALIGN-FL accepts decoder uploads only, got {upload.kind!r}")
        decoder = load_decoder(upload.spec, upload.tensors)
        decoder.requires_grad_(False)
        self.decoders[upload.client] = HeldDecoder(decoder, upload, arrived)

    def _latents(self, upload: Uplink, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.sampling == "gmm":
            return sample_latent_gmm(upload.extras[ARTIFACT], n, generator)
        return torch.randn(n, upload.spec["latent_dim"], generator=generator)

    def synthesize(self, counts: dict[int, int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode ``counts[k]`` samples from client k's decoder (clients in id order); labels are client ids."""
        xs, ys = [], []
        for cid in sorted(counts):
            if counts[cid] <= 0:
                continue
            held = self.decoders[cid]
            xs.append(decode(held.decoder, self._latents(held.upload, counts[cid], generator)))
            ys.append(torch.full((counts[cid],), cid, dtype=torch.long))
        return torch.cat(xs), torch.cat(ys)

    def round_generator(self, rnd: int) -> torch.Generator:
        return seeded_generator(self.seed, SERVER_ROUND, rnd)

    def train_global(self, synthetic: torch.Tensor, epochs: int, generator: torch.Generator) -> float:
        return train_epochs(self.vae, self.optimizer, synthetic, epochs, self.settings.batch_size,
                            self.settings.lambda_kl, generator, precision=self.settings.precision)
