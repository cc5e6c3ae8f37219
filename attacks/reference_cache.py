"""A folder of trained reference decoders, shared by the audits of a sweep's runs.

A reference decoder is a deterministic function of what it was trained from: the public population
records (the test split's records of the client's classes), the architecture spec, the recipe and the
random stream (audit seed, client). Runs of a sweep that share all of these (e.g. ALIGN-FL, FedAvg and
DP-SGD at one seed: same recipe, same classes) can share the reference instead of training it again.

The cache key is the sha256 of exactly that material; an entry is a safetensors file (never a pickle)
beside a JSON sidecar that repeats the key material, the entry's sha256 and where it was made. An entry
whose sidecar, key or checksum does not match is not used: it is trained again and replaced. Nothing is
cached unless the caller names a folder (a sweep uses one under its output folder); there is no hidden
global cache.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from federation.models import load_decoder

ENTRY_FORMAT = "alignfl-reference-decoder/1"


def key_material(dataset: str, classes: list[int], population: torch.Tensor, spec: dict, recipe,
                 stream: tuple[int, ...]) -> dict:
    """Everything a reference decoder is trained from, as plain JSON values."""
    digest = hashlib.sha256(population.contiguous().numpy().tobytes()).hexdigest()
    return {"format": ENTRY_FORMAT, "dataset": dataset, "classes": sorted(int(c) for c in classes),
            "population_sha256": digest, "population_records": int(len(population)), "spec": spec,
            "recipe": dataclasses.asdict(recipe), "generator_stream": [int(p) for p in stream]}


def cache_key(material: dict) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


class ReferenceCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.safetensors", self.root / f"{key}.json"

    def load(self, material: dict) -> tuple[nn.Module | None, dict]:
        """(the cached decoder or None, what the audit records about the look-up)."""
        key = cache_key(material)
        weights, sidecar = self._paths(key)
        record = {"cache": str(self.root), "key": key, "hit": False}
        if not weights.is_file():
            return None, record
        try:
            meta = json.loads(sidecar.read_text())
            blob = weights.read_bytes()
            if meta.get("material") != material or meta.get("sha256") != hashlib.sha256(blob).hexdigest():
                raise ValueError("sidecar does not match")
            decoder = load_decoder(material["spec"], load_file(str(weights)))
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            record["replaced_entry"] = f"unusable cache entry ({type(err).__name__}): trained again"
            return None, record
        record.update(hit=True, created_by=meta.get("created_by"), created_at=meta.get("created_at"))
        return _frozen(decoder), record

    def store(self, material: dict, decoder: nn.Module, created_by: str) -> None:
        key = cache_key(material)
        weights, sidecar = self._paths(key)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = weights.with_name(f".{weights.name}.tmp")
        save_file({k: v.detach().contiguous() for k, v in decoder.state_dict().items()}, str(tmp))
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        tmp.replace(weights)
        meta = {"material": material, "sha256": digest, "created_by": created_by,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "torch_threads": torch.get_num_threads()}
        tmp_meta = sidecar.with_name(f".{sidecar.name}.tmp")
        tmp_meta.write_text(json.dumps(meta, indent=1))
        tmp_meta.replace(sidecar)


def _frozen(decoder: nn.Module) -> nn.Module:
    decoder.eval()
    decoder.requires_grad_(False)
    return decoder
