"""ALIGN-FL: clients upload only their decoders; the server trains a global VAE on synthetic data."""
from __future__ import annotations

from pathlib import Path

import torch

from federation.client import Client
from federation.errors import UploadRejected
from federation.messages import load_upload, write_upload
from federation.server import AlignFLServer
from federation.strategies.participation import Participation
from federation.training import TrainSettings


class AlignFL:
    name = "alignfl"

    def __init__(self, clients: list[Client], settings: TrainSettings, server_spec: dict, seed: int, *,
                 samples_per_client: int, server_epochs: int, sampling: str = "prior", gmm_components: int = 10,
                 participation: float = 1.0, **_):
        self.clients = clients
        self.rounds = settings.rounds
        self.server = AlignFLServer(server_spec, settings, seed, sampling)
        self.samples_per_client = samples_per_client
        self.server_epochs = server_epochs
        self.gmm_components = gmm_components if sampling == "gmm" else 0
        self.last_synthetic: tuple[torch.Tensor, torch.Tensor] | None = None
        self.participation = Participation(participation, seed)

    @property
    def shared_artifacts(self) -> list[str]:
        return ["decoder", "decoder_spec"] + (["latent_gmm"] if self.gmm_components else [])

    def run_round(self, rnd: int, shared_dir: Path, tick=lambda msg: None) -> dict:
        record: dict = {"round": rnd, "rejected": {}}
        for client in self.clients:
            tick(f"round {rnd} client {client.id}")
            if not self.participation.draw(record, client.id):
                continue  # dropped out: trains nothing, spends no budget, shares nothing this round
            record[f"client{client.id}_loss"] = loss = client.train_round(federation_round=rnd)
            if loss is None:  # budget spent: nothing new leaves the client; the server keeps its last decoder
                continue
            path = write_upload(client.decoder_upload(rnd, self.gmm_components), shared_dir)
            try:
                self.server.accept(load_upload(path))
            except UploadRejected as err:  # the client is left out of this round; the others carry on
                record["rejected"][client.id] = str(err)
        tick(f"round {rnd} server")
        if self.server.decoders:
            x, y = self.server.synthesize(self.samples_per_client)
            record["server_loss"] = self.server.train_global(x, self.server_epochs)
            self.last_synthetic = (x, y)
        return record

    def state_dict(self) -> dict:
        return {"server": self.server.state_dict(), "participation": self.participation.state_dict(),
                "last_synthetic": list(self.last_synthetic) if self.last_synthetic is not None else None}

    def load_state_dict(self, state: dict, shared_root: Path) -> None:
        self.server.load_state_dict(state["server"], shared_root)
        self.participation.load_state_dict(state["participation"])
        self.last_synthetic = tuple(state["last_synthetic"]) if state["last_synthetic"] is not None else None

    @property
    def global_vae(self):
        return self.server.vae

    def client_decoders(self) -> dict[int, torch.nn.Module]:
        return {cid: dec for cid, (dec, _) in self.server.decoders.items()}

    def synthetic_set(self):
        return self.last_synthetic
