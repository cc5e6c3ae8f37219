"""What the adversary holds: every message that crossed the boundary, round by round (the decoders
clients shared, and what the server sent down), and the run's partition record (which public record
ids were members, held out, outliers, controls, canaries).

Only ``shared/round-R/`` and ``partition.json`` are read. Every message goes through the same
validation as in the federation (``federation.messages``: safetensors, never pickle); a message that
fails it is reported, not used. Runs written before downlinks existed hold uplinks only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from federation import run_layout as layout
from federation.errors import DataError, UploadRejected
from federation.messages import load_downlink, load_uplink
from federation.models import load_decoder, load_vae


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
class SharedDownlink:
    round: int
    recipients: tuple[int, ...]
    kind: str
    spec: dict | None
    decoder: nn.Module | None  # the decoder inside the payload, when it carries one


@dataclass
class SharedRun:
    path: Path
    partition: dict
    decoders: dict[int, dict[int, SharedDecoder]]  # client -> round -> decoder
    rejected: list[dict] = field(default_factory=list)
    downlinks: list[SharedDownlink] = field(default_factory=list)  # in round order

    def final(self, client: int) -> SharedDecoder:
        """The last decoder a client shared."""
        rounds = self.decoders[client]
        return rounds[max(rounds)]

    @property
    def clients(self) -> list[int]:
        return sorted(self.decoders)


def _module(payload) -> nn.Module | None:
    if payload.kind == "decoder":
        module = load_decoder(payload.spec, payload.tensors)
    elif payload.kind == "vae":
        module = load_vae(payload.spec, payload.tensors).decoder
    else:
        return None
    module.eval()
    module.requires_grad_(False)
    return module


def read_partition(run_dir: Path) -> dict:
    path = Path(run_dir) / layout.PARTITION
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
    downlinks: list[SharedDownlink] = []
    rejected = []
    rounds = sorted((int(m.group(1)), p) for p in (run_dir / layout.SHARED).glob("round-*")
                    if (m := layout.ROUND_DIR.search(p.name)) and p.is_dir())
    for rnd, folder in rounds:
        for path in sorted(folder.glob("*.safetensors")):
            try:
                if layout.UPLINK_FILE.search(path.name):
                    upload = load_uplink(path, allow_legacy=True)  # a run of any version
                    module = _module(upload.payload)
                    if module is not None:  # an uplink that shares nothing (e.g. a spent budget) holds no decoder
                        decoders.setdefault(upload.client, {})[rnd] = SharedDecoder(
                            upload.client, rnd, upload.spec, module, upload.kind, sorted(upload.extras))
                elif layout.DOWNLINK_FILE.search(path.name):
                    down = load_downlink(path)
                    downlinks.append(SharedDownlink(rnd, down.recipients, down.payload.kind, down.payload.spec,
                                                    _module(down.payload)))
            except UploadRejected as err:
                rejected.append({"round": rnd, "file": path.name, "reason": str(err)})
    if not decoders:
        raise DataError(f"{run_dir} holds no valid shared decoder under shared/round-*/ "
                        f"({len(rejected)} rejected)")
    return SharedRun(run_dir, partition, decoders, rejected, downlinks)


@torch.no_grad()
def generate(decoder: nn.Module, latent_dim: int, n: int, generator: torch.Generator,
             batch: int = 2048) -> torch.Tensor:
    """n samples from the prior N(0, I) through a decoder, flattened to (n, pixels)."""
    z = torch.randn(n, latent_dim, generator=generator)
    return torch.cat([decoder(z[i:i + batch]).flatten(1) for i in range(0, n, batch)])
