"""The messages that cross the federation boundary, in both directions, and their encoded form.

A message is a payload (a kind, an architecture spec, named tensors, declared extra artifacts) plus an
envelope: a *downlink* goes from the server to one or more clients, an *uplink* from one client to the
server. Encoded, a message is a safetensors blob and a JSON sidecar; these exact bytes are what an
engine carries and what ``shared/round-R/`` holds, so the audit sees what crossed the boundary.

Decoding validates everything before anything uses it, and never unpickles: the sidecar's fields and
their types, the blob's sha256 and size, the payload kind, every tensor's name, shape and dtype against
the architecture spec, finiteness, and the uplink's client report (status, loss, DP events).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load, save as st_save

from federation.errors import ConfigError, UploadRejected
from federation.hypernetwork import HYPERNETWORK_KIND, UPDATE_KIND, hypernetwork_tensors, normalize_hyper_spec
from federation.models import VAE, build_decoder, normalize_spec
from federation.privacy.ledger import DPEvent

FORMAT = "alignfl-message/1"
LEGACY_UPLOAD_FORMAT = "alignfl-upload/1"  # uplinks written before downlinks existed: read, never written
DIRECTIONS = ("uplink", "downlink")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
REPORT_STATUSES = ("trained", "budget-exhausted")


# ------------------------------------------------------------------------------------ payload kinds
def _decoder_tensors(spec: dict) -> dict[str, torch.Tensor]:
    return build_decoder(spec).state_dict()


def _vae_tensors(spec: dict) -> dict[str, torch.Tensor]:
    return VAE(spec).state_dict()


# kind -> the tensors a payload of that kind must hold, from its spec (None: no spec, no tensors)
PAYLOAD_KINDS: dict[str, Callable[[dict], dict[str, torch.Tensor]] | None] = {
    "decoder": _decoder_tensors,  # ALIGN-FL's uplink
    "vae": _vae_tensors,  # FedAvg/FedProx: the whole VAE, up and down
    "empty": None,  # an instruction with no tensors, or a reply that shares nothing
}
# kind -> how its spec is checked (default: a VAE architecture spec, ``normalize_spec``)
SPEC_CHECKS: dict[str, Callable[[dict], dict]] = {}
# kinds that may carry nothing beyond their own tensors (no declared extra artifact)
NO_EXTRAS: set[str] = set()


def register_payload_kind(kind: str, expected: Callable[[dict], dict[str, torch.Tensor]] | None,
                          spec_check: Callable[[dict], dict] | None = None, extras: bool = True) -> None:
    """A strategy that sends a new kind of payload registers how to validate it: the tensors its spec
    requires, how the spec itself is checked (default: a VAE spec), and whether it may declare extra
    artifacts (``extras=False``: a message of this kind that declares one is rejected)."""
    if kind in PAYLOAD_KINDS and PAYLOAD_KINDS[kind] is not expected:
        raise ValueError(f"payload kind {kind!r} is already registered")
    PAYLOAD_KINDS[kind] = expected
    if spec_check is not None:
        SPEC_CHECKS[kind] = spec_check
    if not extras:
        NO_EXTRAS.add(kind)


for _kind in (HYPERNETWORK_KIND, UPDATE_KIND):  # FedHypeVAE: the hypernetwork down, a client's update up
    register_payload_kind(_kind, hypernetwork_tensors, normalize_hyper_spec, extras=False)

# what a message of each kind is, in words (``alignfl-audit inspect-upload``)
KIND_DESCRIPTIONS = {
    "decoder": "a client's decoder (ALIGN-FL): the weights the server decodes synthetic data from",
    "vae": "a whole VAE, encoder included (FedAvg/FedProx)",
    "empty": "no tensors: an instruction to train, or a reply that shares nothing",
    HYPERNETWORK_KIND: "FedHypeVAE's shared hypernetwork: it generates a decoder and class prior from a code; "
                       "no code and no encoder are in it",
    UPDATE_KIND: "a FedHypeVAE client's hypernetwork update (trained minus received hypernetwork), nothing else: "
                 "its private code, its encoder and its generated decoder stay on the client",
}


# ------------------------------------------------------------------------------------------ types
@dataclass
class Payload:
    kind: str
    spec: dict | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # declared extra artifacts

    def flat_tensors(self) -> dict[str, torch.Tensor]:
        flat = {f"{self.kind}.{k}": v for k, v in self.tensors.items()}
        for name, tensors in self.extras.items():
            flat.update({f"extra.{name}.{k}": v for k, v in tensors.items()})
        return {k: v.detach().cpu().contiguous() for k, v in flat.items()}


@dataclass
class ClientReport:
    """What a client says about its round besides the payload. Under DP-SGD the loss is withheld:
    it is computed on private records without noise, and no epsilon would cover it."""

    status: str = "trained"
    loss: float | None = None
    dp_events: list[DPEvent] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"status": self.status, "loss": self.loss, "dp_events": [vars(e).copy() for e in self.dp_events]}


@dataclass
class Downlink:
    round: int
    recipients: tuple[int, ...]
    payload: Payload
    direction = "downlink"


@dataclass
class Uplink:
    client: int
    round: int  # the round whose downlink this answers (the round the client trained in)
    payload: Payload
    num_samples: int
    report: ClientReport = field(default_factory=ClientReport)
    direction = "uplink"

    # the shared-decoder view used by the audit and inspect-upload
    @property
    def kind(self) -> str:
        return self.payload.kind

    @property
    def spec(self) -> dict | None:
        return self.payload.spec

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return self.payload.tensors

    @property
    def extras(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.payload.extras


Message = Downlink | Uplink


# ------------------------------------------------------------------------------------------ encoding
def encode(message: Message) -> tuple[bytes, dict]:
    """The message's blob and sidecar, exactly as written to shared/ and carried by an engine."""
    p = message.payload
    blob = st_save(p.flat_tensors())
    meta = {"format": FORMAT, "direction": message.direction, "round": message.round, "kind": p.kind,
            "spec": p.spec, "extra_artifacts": sorted(p.extras)}
    if isinstance(message, Uplink):
        meta.update(client=message.client, num_samples=message.num_samples, report=message.report.to_json())
    else:
        meta.update(recipients=sorted(message.recipients))
    meta.update(sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
    return blob, meta


def file_stem(direction: str, recipients_or_client) -> str:
    """``client-K`` for an uplink; ``server-to-client-K`` for a downlink to one client,
    ``server-to-clients`` for one sent to several."""
    if direction == "uplink":
        return f"client-{int(recipients_or_client)}"
    recipients = sorted(recipients_or_client)
    return f"server-to-client-{recipients[0]}" if len(recipients) == 1 else "server-to-clients"


def write_encoded(blob: bytes, meta: dict, folder: Path, stem: str) -> Path:
    """Write a blob and its sidecar as received (before anything decodes them); returns the blob's path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.safetensors"
    _atomic_write(path, blob)
    _atomic_write(path.with_suffix(".json"), json.dumps(meta, indent=2).encode())
    return path


def write_message(message: Message, folder: Path) -> Path:
    blob, meta = encode(message)
    who = message.client if isinstance(message, Uplink) else message.recipients
    return write_encoded(blob, meta, folder, file_stem(message.direction, who))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------ decoding
def decode(blob: bytes, meta, *, direction: str, name: str, kinds: tuple[str, ...] | None = None,
           max_bytes: int = MAX_MESSAGE_BYTES, allow_legacy: bool = False) -> Message:
    """Validate a received message; raises ``UploadRejected`` with the reason (``name`` says which).
    ``allow_legacy``: also read an uplink of the earlier upload format, which carries no DP report (only
    when reading a run written by an earlier version; a live round refuses it)."""
    if len(blob) > max_bytes:
        raise UploadRejected(f"{name}: {len(blob)} bytes exceeds the {max_bytes}-byte limit")
    if not isinstance(meta, dict):
        raise UploadRejected(f"{name}: the sidecar is not a JSON object")
    legacy = allow_legacy and meta.get("format") == LEGACY_UPLOAD_FORMAT and direction == "uplink"
    if meta.get("format") != FORMAT and not legacy:
        raise UploadRejected(f"{name}: not an {FORMAT} sidecar")
    if not legacy and meta.get("direction") != direction:
        raise UploadRejected(f"{name}: a {meta.get('direction')!r} message where a {direction} was expected")
    _check_int(meta, "round", name, minimum=0)
    if not isinstance(meta.get("sha256"), str):
        raise UploadRejected(f"{name}: sha256 missing")
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise UploadRejected(f"{name}: content does not match the sha256 in its sidecar")
    kind = meta.get("kind")
    allowed = tuple(PAYLOAD_KINDS) if kinds is None else kinds
    if kind not in allowed or kind not in PAYLOAD_KINDS:
        raise UploadRejected(f"{name}: kind {kind!r} is not one of {allowed}")
    extras_declared = meta.get("extra_artifacts", [])
    if not isinstance(extras_declared, list) or not all(isinstance(e, str) and e.isidentifier()
                                                        for e in extras_declared):
        raise UploadRejected(f"{name}: extra_artifacts must be a list of names, got {extras_declared!r}")
    if extras_declared and kind in NO_EXTRAS:
        raise UploadRejected(f"{name}: a {kind!r} message carries nothing beyond its own tensors, but it declares "
                             f"extra artifacts {extras_declared}")
    payload = _payload(blob, kind, meta.get("spec"), extras_declared, name)
    if direction == "downlink":
        recipients = meta.get("recipients")
        if not isinstance(recipients, list) or not recipients or not all(_is_int(r) and r >= 0 for r in recipients):
            raise UploadRejected(f"{name}: recipients must be a non-empty list of client ids, got {recipients!r}")
        return Downlink(meta["round"], tuple(recipients), payload)
    _check_int(meta, "client", name, minimum=0)
    _check_int(meta, "num_samples", name, minimum=1)
    report = ClientReport() if legacy else decode_report(meta.get("report"), meta["client"], name, meta["round"])
    return Uplink(meta["client"], meta["round"], payload, meta["num_samples"], report)


def _payload(blob: bytes, kind: str, spec, extras_declared: list[str], name: str) -> Payload:
    expected_fn = PAYLOAD_KINDS[kind]
    if expected_fn is not None:
        try:
            spec = SPEC_CHECKS.get(kind, normalize_spec)(spec)
        except ConfigError as err:
            raise UploadRejected(f"{name}: spec rejected: {err}") from None
    elif spec is not None:
        raise UploadRejected(f"{name}: a {kind!r} message carries no spec")
    try:
        flat = st_load(blob)  # safetensors: a JSON header and raw buffers, never pickle
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise UploadRejected(f"{name}: not a valid safetensors file ({err})") from None
    expected = expected_fn(spec) if expected_fn is not None else {}
    tensors = {k[len(kind) + 1:]: v for k, v in flat.items() if k.startswith(kind + ".")}
    unknown = [k for k in flat if not k.startswith(kind + ".")
               and not any(k.startswith(f"extra.{e}.") for e in extras_declared)]
    if unknown:
        raise UploadRejected(f"{name}: undeclared tensors {unknown[:3]}")
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        what = f"the {spec['arch']} spec" if spec else f"a {kind!r} message"
        raise UploadRejected(f"{name}: tensors do not match {what} (missing {missing[:3]}, unexpected {extra[:3]})")
    for tname, ref in expected.items():
        got = tensors[tname]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise UploadRejected(f"{name}: tensor {tname} is {tuple(got.shape)} {got.dtype}, the spec "
                                 f"(latent_dim={spec['latent_dim']}) needs {tuple(ref.shape)} {ref.dtype}")
    for tname, t in flat.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UploadRejected(f"{name}: tensor {tname} has non-finite values")
    extras = {e: {k[len(f"extra.{e}."):]: v for k, v in flat.items() if k.startswith(f"extra.{e}.")}
              for e in extras_declared}
    return Payload(kind, spec, {t: tensors[t] for t in expected}, extras)  # in the module's own order


_EVENT_TYPES = {"client": int, "round": int, "sample_rate": float, "noise_multiplier": float, "steps": int,
                "clipping": str, "scope": str, "grad_sample_mode": str, "clip_bound_start": float,
                "clip_bound_end": float}


def decode_report(report, client: int, name: str, rnd: int | None = None) -> ClientReport:
    """A client's report; its DP events are the client's whole history up to round ``rnd``."""
    if not isinstance(report, dict) or set(report) != {"status", "loss", "dp_events"}:
        raise UploadRejected(f"{name}: the client report must hold exactly status, loss and dp_events")
    if report["status"] not in REPORT_STATUSES:
        raise UploadRejected(f"{name}: report status {report['status']!r} is not one of {REPORT_STATUSES}")
    loss = report["loss"]
    if loss is not None and not (isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss)):
        raise UploadRejected(f"{name}: report loss must be a finite number or null, got {loss!r}")
    events = report["dp_events"]
    if not isinstance(events, list):
        raise UploadRejected(f"{name}: report dp_events must be a list")
    parsed = []
    for e in events:
        if not isinstance(e, dict) or set(e) != set(_EVENT_TYPES):
            raise UploadRejected(f"{name}: a DP event must hold exactly {sorted(_EVENT_TYPES)}")
        for key, typ in _EVENT_TYPES.items():
            ok = _is_int(e[key]) if typ is int else (
                isinstance(e[key], (int, float)) and not isinstance(e[key], bool) and math.isfinite(e[key])
                if typ is float else isinstance(e[key], str))
            if not ok:
                raise UploadRejected(f"{name}: DP event field {key} must be {typ.__name__}, got {e[key]!r}")
        if e["client"] != client:
            raise UploadRejected(f"{name}: a DP event of client {e['client']} in client {client}'s report")
        if rnd is not None and not 0 <= e["round"] <= rnd:
            raise UploadRejected(f"{name}: a DP event of round {e['round']} in a reply to round {rnd}")
        parsed.append(DPEvent(**{k: (float(v) if _EVENT_TYPES[k] is float else v) for k, v in e.items()}))
    return ClientReport(report["status"], None if loss is None else float(loss), parsed)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(meta: dict, key: str, name: str, minimum: int) -> None:
    if not _is_int(meta.get(key)) or meta[key] < minimum:
        what = "positive" if minimum == 1 else "non-negative"
        raise UploadRejected(f"{name}: {key} must be a {what} integer, got {meta.get(key)!r}")


# ------------------------------------------------------------------------------------------ files
def read_encoded(path: Path, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[bytes, object]:
    path = Path(path)
    meta_path = path.with_suffix(".json")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise UploadRejected(f"{path.name}: {size} bytes exceeds the {max_bytes}-byte limit")
        meta = json.loads(meta_path.read_text())
        blob = path.read_bytes()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UploadRejected(f"{path.name}: unreadable message ({err})") from None
    return blob, meta


def _load(path: Path, direction: str, kinds, max_bytes: int, allow_legacy: bool = False):
    """Read and validate a message file; its name must match who sent it (uplink) or whom it addresses."""
    path = Path(path)
    blob, meta = read_encoded(path, max_bytes)
    msg = decode(blob, meta, direction=direction, name=path.name, kinds=kinds, max_bytes=max_bytes,
                 allow_legacy=allow_legacy)
    who = msg.client if direction == "uplink" else msg.recipients
    if path.stem != file_stem(direction, who):
        said = f"says client {who}" if direction == "uplink" else f"addresses clients {list(who)}"
        raise UploadRejected(f"{path.with_suffix('.json').name}: the sidecar {said} but the file is {path.name}")
    return msg


def load_uplink(path: Path, kinds: tuple[str, ...] | None = None, max_bytes: int = MAX_MESSAGE_BYTES,
                allow_legacy: bool = False) -> Uplink:
    """Read and validate ``client-K.safetensors`` (+ .json); the file must be named for its sender."""
    return _load(path, "uplink", kinds, max_bytes, allow_legacy)


def load_downlink(path: Path, kinds: tuple[str, ...] | None = None, max_bytes: int = MAX_MESSAGE_BYTES) -> Downlink:
    """Read and validate ``server-to-client(s)*.safetensors`` (+ .json); named for its recipients."""
    return _load(path, "downlink", kinds, max_bytes)


def load_message(path: Path, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """An uplink or a downlink, by its file name, as stored in a run directory (of any version)."""
    path = Path(path)
    if path.stem.startswith("server-to-client"):
        return load_downlink(path, max_bytes=max_bytes)
    return load_uplink(path, max_bytes=max_bytes, allow_legacy=True)


def parameter_count(tensors: dict[str, torch.Tensor]) -> int:
    return int(sum(math.prod(t.shape) for t in tensors.values()))
