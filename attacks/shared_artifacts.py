"""What the adversary holds: the decoders every client shared, round by round, and the run's
partition record (which public record ids were members, held out, outliers, controls, canaries).

Only ``shared/round-R/client-K.{safetensors,json}`` and ``partition.json`` are read. Every upload
goes through the server's own validation (``federation.messages.load_upload``: safetensors, never
pickle); an upload that fails it is reported, not used.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from federation.errors import DataError, UploadRejected
from federation.messages import load_upload
from federation.models import VAE, build_decoder

_ROUND = re.compile(r"round-(\d+)$")
_CLIENT = re.compile(r"client-(\d+)\.safetensors$")


@dataclass
class SharedDecoder:
    client: int
    round: int
    spec: dict
    decoder: nn.Module
    kind: str  # "decoder" (ALIGN-FL) or "vae" (FedAvg/FedProx share the whole model)
    extra_artifacts: list[str]

    @property
    def latent_dim(self) -> int:
        return self.spec["latent_dim"]


@dataclass
class SharedRun:
    path: Path
    partition: dict
    decoders: dict[int, dict[int, SharedDecoder]]  # client -> round -> decoder
    rejected: list[dict] = field(default_factory=list)

    def final(self, client: int) -> SharedDecoder:
        """The last decoder a client shared."""
        rounds = self.decoders[client]
        return rounds[max(rounds)]

    @property
    def clients(self) -> list[int]:
        return sorted(self.decoders)


def _module(upload) -> nn.Module:
    if upload.kind == "decoder":
        module = build_decoder(upload.spec)
        module.load_state_dict(upload.tensors)
    else:
        vae = VAE(upload.spec)
        vae.load_state_dict(upload.tensors)
        module = vae.decoder
    module.eval()
    module.requires_grad_(False)
    return module


def read_partition(run_dir: Path) -> dict:
    path = Path(run_dir) / "partition.json"
    try:
        partition = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the partition record {path}: {err}") from None
    if not isinstance(partition, dict) or not isinstance(partition.get("clients"), list):
        raise DataError(f"{path} is not a partition record (no clients list)")
    return partition


def load_shared_run(run_dir: str | Path) -> SharedRun:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"no run directory at {run_dir}")
    partition = read_partition(run_dir)
    decoders: dict[int, dict[int, SharedDecoder]] = {}
    rejected = []
    rounds = sorted((int(m.group(1)), p) for p in (run_dir / "shared").glob("round-*")
                    if (m := _ROUND.search(p.name)) and p.is_dir())
    for rnd, folder in rounds:
        for path in sorted(folder.glob("client-*.safetensors")):
            if not _CLIENT.search(path.name):
                continue
            try:
                upload = load_upload(path)
            except UploadRejected as err:
                rejected.append({"round": rnd, "file": path.name, "reason": str(err)})
                continue
            decoders.setdefault(upload.client, {})[rnd] = SharedDecoder(
                upload.client, rnd, upload.spec, _module(upload), upload.kind, sorted(upload.extras))
    if not decoders:
        raise DataError(f"{run_dir} holds no valid shared decoder under shared/round-*/ "
                        f"({len(rejected)} rejected)")
    return SharedRun(run_dir, partition, decoders, rejected)


@torch.no_grad()
def generate(decoder: nn.Module, latent_dim: int, n: int, generator: torch.Generator,
             batch: int = 2048) -> torch.Tensor:
    """n samples from the prior N(0, I) through a decoder, flattened to (n, pixels)."""
    z = torch.randn(n, latent_dim, generator=generator)
    return torch.cat([decoder(z[i:i + batch]).flatten(1) for i in range(0, n, batch)])
