"""FedAvg and FedProx baselines: clients share their whole VAE; the server averages all parameters
weighted by sample count. FedProx adds mu/2 * ||w - w_global||^2 to the local loss."""
from __future__ import annotations

from pathlib import Path

import torch

from federation.client import Client
from federation.errors import UploadRejected
from federation.messages import load_upload, write_upload
from federation.models import VAE
from federation.server import AlignFLServer
from federation.strategies.participation import Participation
from federation.training import TrainSettings, decode


class FedAvg:
    name = "fedavg"
    shared_artifacts = ["vae", "vae_spec"]

    def __init__(self, clients: list[Client], settings: TrainSettings, server_spec: dict, seed: int, *,
                 samples_per_client: int, prox_mu: float = 0.0, sampling: str = "prior",
                 participation: float = 1.0, **_):
        self.clients = clients
        self.settings = settings
        self.rounds = settings.rounds
        self.prox_mu = prox_mu
        self.name = "fedprox" if prox_mu > 0 else "fedavg"
        # the server's latent sampler is reused for TSTR data from the uploaded decoders
        self.sampler = AlignFLServer(clients[0].vae.spec, settings, seed, sampling)
        self.global_state = {k: v.clone() for k, v in clients[0].vae.state_dict().items()}
        self._global = VAE(clients[0].vae.spec)
        self.samples_per_client = samples_per_client
        self.last_uploads: dict[int, dict] = {}
        self.participation = Participation(participation, seed)

    def run_round(self, rnd: int, shared_dir: Path, tick=lambda msg: None) -> dict:
        record: dict = {"round": rnd, "rejected": {}}
        accepted = []
        ref = {k: v.detach().clone() for k, v in self.global_state.items()}
        for client in self.clients:
            tick(f"round {rnd} client {client.id}")
            if not self.participation.draw(record, client.id):
                continue
            client.load_global(self.global_state)
            client.optimizer = torch.optim.Adam(client.vae.parameters(), lr=self.settings.lr)
            record[f"client{client.id}_loss"] = client.train_round(self.prox_mu, ref, federation_round=rnd)
            path = write_upload(client.full_upload(rnd), shared_dir)
            try:
                upload = load_upload(path)
            except UploadRejected as err:
                record["rejected"][client.id] = str(err)
                continue
            accepted.append(upload)
            self.last_uploads[client.id] = upload
        tick(f"round {rnd} server")
        if accepted:
            total = sum(u.num_samples for u in accepted)
            self.global_state = {k: sum(u.tensors[k].double() * (u.num_samples / total) for u in accepted)
                                 .to(self.global_state[k].dtype) for k in self.global_state}
            self._global.load_state_dict(self.global_state)
        return record

    def state_dict(self) -> dict:
        return {"global_state": self.global_state, "sampler_generator": self.sampler.generator.get_state(),
                "participation": self.participation.state_dict(),
                "last_uploads": {str(cid): up.round for cid, up in self.last_uploads.items()}}

    def load_state_dict(self, state: dict, shared_root: Path) -> None:
        self.global_state = state["global_state"]
        self._global.load_state_dict(self.global_state)
        self.sampler.generator.set_state(state["sampler_generator"])
        self.participation.load_state_dict(state["participation"])
        self.last_uploads = {int(cid): load_upload(shared_root / f"round-{rnd}" / f"client-{cid}.safetensors")
                             for cid, rnd in state["last_uploads"].items()}

    @property
    def global_vae(self):
        return self._global

    def client_decoders(self) -> dict[int, torch.nn.Module]:
        out = {}
        for cid, upload in self.last_uploads.items():
            vae = VAE(upload.spec)
            vae.load_state_dict(upload.tensors)
            out[cid] = vae.decoder
        return out

    def synthetic_set(self):
        xs, ys = [], []
        for cid, dec in sorted(self.client_decoders().items()):
            z = torch.randn(self.samples_per_client, self.sampler.vae.latent_dim, generator=self.sampler.generator)
            xs.append(decode(dec, z))
            ys.append(torch.full((self.samples_per_client,), cid, dtype=torch.long))
        return (torch.cat(xs), torch.cat(ys)) if xs else None
