"""The client -> server message and its on-disk form: a safetensors file plus a JSON sidecar.

This is the federation boundary. What is written here is exactly what left a client; the server
reads uploads back only through ``load_upload``, which never unpickles and validates every
tensor against the architecture spec before anything uses it.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load, save as st_save

from federation.errors import ConfigError, UploadRejected
from federation.models import VAE, build_decoder, normalize_spec

FORMAT = "alignfl-upload/1"
KINDS = ("decoder", "vae")  # ALIGN-FL shares a decoder; FedAvg/FedProx share the whole VAE
MAX_UPLOAD_BYTES = 64 * 1024 * 1024


@dataclass
class Upload:
    client: int
    round: int
    kind: str
    spec: dict
    tensors: dict[str, torch.Tensor]
    num_samples: int
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # declared extra artifacts

    def flat_tensors(self) -> dict[str, torch.Tensor]:
        flat = {f"{self.kind}.{k}": v for k, v in self.tensors.items()}
        for name, tensors in self.extras.items():
            flat.update({f"extra.{name}.{k}": v for k, v in tensors.items()})
        return {k: v.detach().cpu().contiguous() for k, v in flat.items()}


def expected_tensors(kind: str, spec: dict) -> dict[str, torch.Tensor]:
    module = build_decoder(spec) if kind == "decoder" else VAE(spec)
    return module.state_dict()


def write_upload(upload: Upload, directory: Path) -> Path:
    """Write ``client-K.safetensors`` and ``client-K.json``; returns the tensor file's path."""
    directory.mkdir(parents=True, exist_ok=True)
    blob = st_save(upload.flat_tensors())
    path = directory / f"client-{upload.client}.safetensors"
    _atomic_write(path, blob)
    meta = {"format": FORMAT, "client": upload.client, "round": upload.round, "kind": upload.kind,
            "spec": upload.spec, "num_samples": upload.num_samples,
            "extra_artifacts": sorted(upload.extras), "sha256": hashlib.sha256(blob).hexdigest(),
            "bytes": len(blob)}
    _atomic_write(path.with_suffix(".json"), json.dumps(meta, indent=2).encode())
    return path


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def load_upload(path: Path, max_bytes: int = MAX_UPLOAD_BYTES) -> Upload:
    """Read and validate an upload; raises ``UploadRejected`` with the reason."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise UploadRejected(f"{path.name}: {size} bytes exceeds the {max_bytes}-byte limit")
        meta = json.loads(meta_path.read_text())
        blob = path.read_bytes()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UploadRejected(f"{path.name}: unreadable upload ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UploadRejected(f"{meta_path.name}: not an {FORMAT} sidecar")
    _check_sidecar_fields(meta, path)
    kind = meta.get("kind")
    if kind not in KINDS:
        raise UploadRejected(f"{meta_path.name}: kind {kind!r} is not one of {KINDS}")
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise UploadRejected(f"{path.name}: content does not match the sha256 in its sidecar")
    try:
        spec = normalize_spec(meta.get("spec"))
    except ConfigError as err:
        raise UploadRejected(f"{meta_path.name}: spec rejected: {err}") from None
    try:
        flat = st_load(blob)  # safetensors: a JSON header and raw buffers, never pickle
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise UploadRejected(f"{path.name}: not a valid safetensors file ({err})") from None
    expected = expected_tensors(kind, spec)
    tensors = {k[len(kind) + 1:]: v for k, v in flat.items() if k.startswith(kind + ".")}
    extras_declared = meta.get("extra_artifacts", [])
    unknown = [k for k in flat if not k.startswith(kind + ".")
               and not any(k.startswith(f"extra.{e}.") for e in extras_declared)]
    if unknown:
        raise UploadRejected(f"{path.name}: undeclared tensors {unknown[:3]}")
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise UploadRejected(f"{path.name}: tensors do not match the {spec['arch']} spec "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for name, ref in expected.items():
        got = tensors[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise UploadRejected(f"{path.name}: tensor {name} is {tuple(got.shape)} {got.dtype}, the spec "
                                 f"(latent_dim={spec['latent_dim']}) needs {tuple(ref.shape)} {ref.dtype}")
    for name, t in flat.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UploadRejected(f"{path.name}: tensor {name} has non-finite values")
    extras = {e: {k[len(f"extra.{e}."):]: v for k, v in flat.items() if k.startswith(f"extra.{e}.")}
              for e in extras_declared}
    tensors = {name: tensors[name] for name in expected}  # in the module's own order
    return Upload(meta["client"], meta["round"], kind, spec, tensors, meta["num_samples"], extras)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sidecar_fields(meta: dict, path: Path) -> None:
    """Every sidecar field has its type, and the client id is the one the file is named for."""
    name = path.with_suffix(".json").name
    for key in ("client", "round", "num_samples"):
        if not _is_int(meta.get(key)) or meta[key] < (1 if key == "num_samples" else 0):
            raise UploadRejected(f"{name}: {key} must be a {'positive' if key == 'num_samples' else 'non-negative'} "
                                 f"integer, got {meta.get(key)!r}")
    if path.stem != f"client-{meta['client']}":
        raise UploadRejected(f"{name}: the sidecar says client {meta['client']} but the file is {path.name}")
    extras = meta.get("extra_artifacts", [])
    if not isinstance(extras, list) or not all(isinstance(e, str) and e.isidentifier() for e in extras):
        raise UploadRejected(f"{name}: extra_artifacts must be a list of names, got {extras!r}")
    if not isinstance(meta.get("sha256"), str):
        raise UploadRejected(f"{name}: sha256 missing")


def parameter_count(tensors: dict[str, torch.Tensor]) -> int:
    return int(sum(math.prod(t.shape) for t in tensors.values()))
