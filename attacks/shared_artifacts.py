"""What the adversary holds: every message that crossed the boundary, round by round (the decoders
clients shared, or under FedHypeVAE each client's hypernetwork update beside the hypernetwork it was sent,
and what the server sent down), and the run's partition record (which public record
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
from federation.hypernetwork import HYPERNETWORK_KIND, UPDATE_KIND, load_hypernetwork
from federation.messages import load_downlink, load_uplink
from federation.models import load_decoder, load_vae


@dataclass
class SharedDecoder:
    client: int
    round: int
    spec: dict
    decoder: nn.Module | None  # None for a hypernetwork update: its decoders depend on the unknown code
    kind: str  # "decoder" (ALIGN-FL), "vae" (FedAvg/FedProx share the whole model) or "hypernetwork_update"
    extra_artifacts: list[str]
    # FedHypeVAE: the hypernetwork the client started its round from (the round's downlink), its update, and
    # the two summed: the hypernetwork the client trained, whose decoders the adversary generates at a code
    # it searches for (``attacks.hyper_code``)
    start: nn.Module | None = None
    update: dict[str, torch.Tensor] | None = None
    hyper: nn.Module | None = None
    trained_round: int | None = None

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
    tensors: dict[str, torch.Tensor] | None = None  # a hypernetwork downlink's tensors


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

    @property
    def hypernetworks(self) -> bool:
        """Whether the clients shared hypernetwork updates (FedHypeVAE) rather than decoders."""
        return any(d.hyper is not None for rounds in self.decoders.values() for d in rounds.values())


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
    rejected, updates = [], []
    rounds = sorted((int(m.group(1)), p) for p in (run_dir / layout.SHARED).glob("round-*")
                    if (m := layout.ROUND_DIR.search(p.name)) and p.is_dir())
    for rnd, folder in rounds:
        for path in sorted(folder.glob("*.safetensors")):
            try:
                if layout.UPLINK_FILE.search(path.name):
                    upload = load_uplink(path, allow_legacy=True)  # a run of any version
                    if upload.kind == UPDATE_KIND:
                        updates.append((rnd, path.name, upload))
                        continue
                    module = _module(upload.payload)
                    if module is not None:  # an uplink that shares nothing (e.g. a spent budget) holds no decoder
                        decoders.setdefault(upload.client, {})[rnd] = SharedDecoder(
                            upload.client, rnd, upload.spec, module, upload.kind, sorted(upload.extras))
                elif layout.DOWNLINK_FILE.search(path.name):
                    down = load_downlink(path)
                    tensors = down.payload.tensors if down.payload.kind == HYPERNETWORK_KIND else None
                    downlinks.append(SharedDownlink(rnd, down.recipients, down.payload.kind, down.payload.spec,
                                                    _module(down.payload), tensors))
            except UploadRejected as err:
                rejected.append({"round": rnd, "file": path.name, "reason": str(err)})
    for rnd, name, upload in updates:
        shared = _trained_hypernetwork(upload, rnd, downlinks)
        if isinstance(shared, str):
            rejected.append({"round": rnd, "file": name, "reason": shared})
        else:
            decoders.setdefault(upload.client, {})[rnd] = shared
    if not decoders:
        raise DataError(f"{run_dir} holds no valid shared decoder under shared/round-*/ "
                        f"({len(rejected)} rejected)")
    return SharedRun(run_dir, partition, decoders, rejected, downlinks)


def _trained_hypernetwork(upload, rnd: int, downlinks: list[SharedDownlink]) -> SharedDecoder | str:
    """A FedHypeVAE update and the hypernetwork the server sent for the round it answers, summed: the
    hypernetwork the client trained (or why it cannot be formed)."""
    sent = [d for d in downlinks if d.round == upload.round and upload.client in d.recipients
            and d.kind == HYPERNETWORK_KIND and d.spec == upload.spec]
    if len(sent) != 1:
        return (f"client {upload.client}'s update answers round {upload.round}, whose hypernetwork downlink to it "
                f"is {'missing' if not sent else 'not unique'}")
    start = load_hypernetwork(upload.spec, sent[0].tensors)
    hyper = load_hypernetwork(upload.spec, {k: v + upload.tensors[k] for k, v in sent[0].tensors.items()})
    for module in (start, hyper):
        module.eval()
        module.requires_grad_(False)
    return SharedDecoder(upload.client, rnd, upload.spec, None, upload.kind, [], start, dict(upload.tensors), hyper,
                         upload.round)


@torch.no_grad()
def generate(decoder: nn.Module, latent_dim: int, n: int, generator: torch.Generator,
             batch: int = 2048) -> torch.Tensor:
    """n samples from the prior N(0, I) through a decoder, flattened to (n, pixels)."""
    z = torch.randn(n, latent_dim, generator=generator)
    return torch.cat([decoder(z[i:i + batch]).flatten(1) for i in range(0, n, batch)])
