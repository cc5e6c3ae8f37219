"""How a strategy's encoded message rides in a Flower ``RecordDict``: the safetensors bytes in a uint8
``Array`` (Flower chunks large arrays on the wire) with their sha256, and the JSON sidecar, the round
and the client id in a ``ConfigRecord``. Both the server (``federation.engines.flower``) and the client
app read and write messages only through this module."""
from __future__ import annotations

import hashlib
import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from federation.errors import UploadRejected

HELLO = "query"  # message type of the first contact, which pins a node to its client id
TRAIN = "train"  # message type of a round's downlink
BLOB, INFO = "payload", "info"


def pack(blob: bytes, meta: dict, rnd: int, client: int, **extra) -> RecordDict:
    info = {"meta": json.dumps(meta), "sha256": hashlib.sha256(blob).hexdigest(), "round": rnd, "client": client,
            **extra}
    return RecordDict({BLOB: ArrayRecord({"bytes": Array(np.frombuffer(blob, dtype=np.uint8))}),
                       INFO: ConfigRecord(info)})


def info(content: RecordDict) -> dict:
    if INFO not in content.config_records:
        raise UploadRejected("a Flower message without its info record")
    return dict(content.config_records[INFO])


def unpack(content: RecordDict, what: str) -> tuple[bytes, dict, int, int]:
    """(blob, sidecar, round, client) of a message, after its integrity check."""
    data = info(content)
    try:
        array = content.array_records[BLOB]["bytes"]
        blob = array.numpy().astype(np.uint8, copy=False).tobytes()
        meta = json.loads(data["meta"])
        rnd, client, digest = int(data["round"]), int(data["client"]), str(data["sha256"])
    except (KeyError, TypeError, ValueError, RecursionError) as err:
        raise UploadRejected(f"{what}: a malformed Flower message ({type(err).__name__}: {err})") from None
    if hashlib.sha256(blob).hexdigest() != digest:
        raise UploadRejected(f"{what}: the payload's sha256 does not match the one sent with it")
    if not isinstance(meta, dict):
        raise UploadRejected(f"{what}: the sidecar is not a JSON object")
    return blob, meta, rnd, client
