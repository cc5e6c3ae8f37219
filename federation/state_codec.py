"""A client's saved state as bytes, without pickle: every tensor goes into a safetensors file and the
rest of the tree (dicts with str or int keys, lists, numbers, strings, booleans, None) into that file's
JSON metadata. A Flower node keeps these bytes between messages (``Context.state``), because each
message may start a fresh ClientApp process."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load as st_load, save as st_save

FORMAT = "alignfl-state-bytes/1"


def state_to_bytes(state) -> bytes:
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = obj.detach().contiguous().clone()
            return {"tensor": name}
        if isinstance(obj, dict):
            for k in obj:
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise TypeError(f"cannot store a dict key of type {type(k).__name__}")
            return {"dict": [[k, walk(v)] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            return {"list": [walk(v) for v in obj]}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return {"value": obj}
        raise TypeError(f"cannot store a value of type {type(obj).__name__}")

    tree = walk(state)
    return st_save(tensors, metadata={"format": FORMAT, "tree": json.dumps(tree)})


def state_from_bytes(blob: bytes):
    tensors = st_load(blob)
    header_len = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8:8 + header_len]).get("__metadata__", {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"not a saved client state (format {meta.get('format')!r})")

    def build(node):
        if "tensor" in node:
            return tensors[node["tensor"]]
        if "dict" in node:
            return {k: build(v) for k, v in node["dict"]}
        if "list" in node:
            return [build(v) for v in node["list"]]
        return node["value"]

    return build(json.loads(meta["tree"]))
