"""The ALIGN-FL server: it keeps each client's last accepted decoder, decodes synthetic data from
them, and trains a persistent global VAE on the union."""
from __future__ import annotations

import torch

from federation.client import seeded_generator
from federation.latent_gmm import ARTIFACT, sample_latent_gmm
from federation.messages import Upload
from federation.models import VAE, build_decoder
from federation.training import TrainSettings, decode, train_epochs


class AlignFLServer:
    def __init__(self, spec: dict, settings: TrainSettings, seed: int, sampling: str = "prior"):
        torch.manual_seed(int(seeded_generator(seed, 3).initial_seed()))
        self.vae = VAE(spec)
        self.optimizer = torch.optim.Adam(self.vae.parameters(), lr=settings.lr)
        self.settings = settings
        self.sampling = sampling
        self.generator = seeded_generator(seed, 4)
        self.decoders: dict[int, tuple[torch.nn.Module, Upload]] = {}

    def state_dict(self) -> dict:
        """The accepted decoders are recorded by (client, round): a resumed server reads them back from
        the run's shared/ folder through the validated upload path."""
        return {"vae": self.vae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "accepted": {str(cid): up.round for cid, (_, up) in self.decoders.items()}}

    def load_state_dict(self, state: dict, shared_root) -> None:
        from federation.messages import load_upload

        self.vae.load_state_dict(state["vae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.decoders = {}
        for cid, rnd in sorted(state["accepted"].items(), key=lambda kv: int(kv[0])):
            self.accept(load_upload(shared_root / f"round-{rnd}" / f"client-{cid}.safetensors"))

    def accept(self, upload: Upload) -> None:
        if upload.kind != "decoder":
            raise ValueError(f"ALIGN-FL accepts decoder uploads only, got {upload.kind!r}")
        decoder = build_decoder(upload.spec)
        decoder.load_state_dict(upload.tensors)
        decoder.requires_grad_(False)
        self.decoders[upload.client] = (decoder, upload)

    def latents(self, upload: Upload, n: int) -> torch.Tensor:
        if self.sampling == "gmm":
            return sample_latent_gmm(upload.extras[ARTIFACT], n, self.generator)
        return torch.randn(n, upload.spec["latent_dim"], generator=self.generator)

    def synthesize(self, n_per_client: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode n samples per accepted client; labels are client ids."""
        xs, ys = [], []
        for cid in sorted(self.decoders):
            decoder, upload = self.decoders[cid]
            xs.append(decode(decoder, self.latents(upload, n_per_client)))
            ys.append(torch.full((n_per_client,), cid, dtype=torch.long))
        return torch.cat(xs), torch.cat(ys)

    def train_global(self, synthetic: torch.Tensor, epochs: int) -> float:
        return train_epochs(self.vae, self.optimizer, synthetic, epochs, self.settings.batch_size,
                            self.settings.lambda_kl, self.generator)
