"""Seeded mutations of a valid converted folder (safetensors shards, index, config.json) for
tests/hardening/test_fuzz_files.py.

`make_base(dir)` writes a tiny converted folder (vocab 300, 2 shards + index) in pg_edge's
layout; `make_cases(base, root, n, seed)` writes `n` mutated copies of it and returns their
paths with a short description of the mutation. Every mutation is reproducible from the seed.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path

CONFIG = {
    "model_type": "paligemma", "image_token_index": 299, "bos_token_id": 2, "eos_token_id": 1,
    "pad_token_id": 0, "projection_dim": 16, "vocab_size": 300,
    "vision_config": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "patch_size": 7, "image_size": 14,
                      "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
    "text_config": {"model_type": "gemma2", "hidden_size": 16, "intermediate_size": 24,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                    "head_dim": 8, "vocab_size": 300, "max_position_embeddings": 64,
                    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "query_pre_attn_scalar": 8,
                    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                    "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
}
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"


def make_base(out: Path) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from pg_edge.model.config import PaliGemmaConfig
    from pg_edge.model.paligemma import PaliGemmaModel

    out.mkdir(parents=True)
    mx.random.seed(0)
    model = PaliGemmaModel(PaliGemmaConfig.from_dict(CONFIG))
    params = dict(tree_flatten(model.parameters()))
    vision = {k: v for k, v in params.items() if not k.startswith("language_model.")}
    text = {k: v for k, v in params.items() if k.startswith("language_model.")}
    weight_map = {}
    for name, part in zip(SHARDS, (vision, text)):
        mx.save_safetensors(str(out / name), part, metadata={"format": "mlx"})
        weight_map.update({k: name for k in part})
    (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(CONFIG))
    return out


# -- safetensors ---------------------------------------------------------------------------
def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header_text: str, body: bytes) -> bytes:
    raw = header_text.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


ODD_NUMBERS = [-1, 0, 1, 3, 2**31, 2**32 + 1, 2**63, 2**64 + 5, 1.5, "4", None, True]
ODD_DTYPES = ["F32", "I32", "F16", "BF16", "U8", "F64", "F8_E4M3", "C64", "x", 7, None]


def mutate_safetensors(data: bytes, r: random.Random) -> tuple[bytes, str]:
    header, body = _split(data)
    names = [k for k in header if k != "__metadata__"]
    name = r.choice(names)
    kind = r.randrange(13)
    if kind == 0:
        cut = r.randrange(len(data))
        return data[:cut], f"truncated at {cut}"
    if kind == 1:
        n = struct.unpack("<Q", data[:8])[0]
        i = r.randrange(8, 8 + n)
        return data[:i] + bytes([data[i] ^ (1 << r.randrange(8))]) + data[i + 1:], f"header bit flip at {i}"
    if kind == 2:
        v = r.choice([0, 1, 7, len(data) - 8, len(data), 2**40, 2**64 - 1])
        return struct.pack("<Q", v) + data[8:], f"header length {v}"
    if kind == 3:
        header[name]["dtype"] = d = r.choice(ODD_DTYPES)
        return _join(json.dumps(header), body), f"{name} dtype {d!r}"
    if kind == 4:
        shape = list(header[name]["shape"])
        op = r.randrange(4)
        if op == 0 and shape:
            shape[r.randrange(len(shape))] = r.choice(ODD_NUMBERS)
        elif op == 1:
            shape.append(r.choice([1, 2, 0, 2**32]))
        elif op == 2 and shape:
            shape.pop()
        else:
            shape = r.choice([[], "3", None, [[2]], {"a": 1}])
        header[name]["shape"] = shape
        return _join(json.dumps(header), body), f"{name} shape {str(shape)[:40]}"
    if kind == 5:
        b, e = header[name]["data_offsets"]
        op = r.randrange(5)
        new = [[0, e - b], [b, e + 4], [b - 4, e - 4], [e, b], [r.choice(ODD_NUMBERS), e]][op]
        header[name]["data_offsets"] = new
        return _join(json.dumps(header), body), f"{name} data_offsets {new}"
    if kind == 6:  # two tensors swap places: a different but valid file
        other = r.choice(names)
        header[name]["data_offsets"], header[other]["data_offsets"] = (
            header[other]["data_offsets"], header[name]["data_offsets"])
        return _join(json.dumps(header), body), f"swap offsets {name} <-> {other}"
    if kind == 7:
        text = json.dumps(header)
        dup = json.dumps({name: header[name]})[1:-1]
        return _join(text[:-1] + ", " + dup + "}", body), f"duplicate key {name}"
    if kind == 8:
        header["__metadata__"] = r.choice([{"format": 1}, [], "mlx", {"format": None}])
        return _join(json.dumps(header), body), "bad __metadata__"
    if kind == 9:
        del header[name]
        return _join(json.dumps(header), body), f"drop {name}"
    if kind == 10:
        extra = r.choice([1, 4, 64])
        return data + b"\0" * extra, f"{extra} trailing bytes"
    if kind == 11:
        i = r.randrange(len(body)) if body else 0
        flipped = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1:] if body else body
        return data[: len(data) - len(body)] + flipped, f"data byte flip at {i}"
    header[name]["extra"] = 1
    return _join(json.dumps(header), body), f"{name} unknown field"


# -- index and config ----------------------------------------------------------------------
def mutate_index(folder: Path, r: random.Random) -> str:
    index = json.loads((folder / INDEX).read_text())
    wm = index["weight_map"]
    key = r.choice(sorted(wm))
    kind = r.randrange(10)
    if kind == 0:
        (folder / INDEX).write_text(r.choice(["{", "[]", "null", "\xff", '{"weight_map": 3}', ""]))
        return "index not a weight_map"
    if kind == 1:
        wm[key] = v = r.choice(["../" + SHARDS[0], "../../x.safetensors", "/etc/passwd",
                                str((folder / wm[key]).resolve()), "C:\\x.safetensors", "a/../../b.safetensors"])
    elif kind == 2:
        wm[key] = v = r.choice([3, None, [], {"a": 1}, "", "missing.safetensors", "config.json"])
    elif kind == 3:  # a FIFO where a shard should be: must not hang
        os.unlink(folder / wm[key])
        os.mkfifo(folder / wm[key])
        v = "FIFO"
    elif kind == 4:
        shard = folder / wm[key]
        os.unlink(shard)
        os.symlink("/dev/zero", shard)
        v = "symlink to /dev/zero"
    elif kind == 5:
        shard = folder / wm[key]
        os.unlink(shard)
        shard.mkdir()
        v = "folder"
    elif kind == 6:  # no index: the shards are found by their names
        os.unlink(folder / INDEX)
        v = "no index"
    elif kind == 7:
        index["weight_map"] = {}
        v = "empty"
    else:
        wm[key] = v = SHARDS[1] if wm[key] == SHARDS[0] else SHARDS[0]
    if (folder / INDEX).exists():
        (folder / INDEX).write_text(json.dumps(index))
    return f"index {key} -> {str(v)[:40]}"


ODD_VALUES = [0, -1, 1, 2, 3, 7, 2**31, 2**40, 0.5, 1e308, "x", "", None, [], {}, True, False,
              float("nan"), float("inf"), "gelu_unknown", ["full_attention"]]


def _leaves(d: dict, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,)


def mutate_config(folder: Path, r: random.Random) -> str:
    cfg = json.loads((folder / "config.json").read_text())
    kind = r.randrange(12)
    if kind == 0:
        (folder / "config.json").write_text(r.choice(["{", "[1]", "null", "\xff\xfe", "", '"paligemma"']))
        return "config not an object"
    paths = list(_leaves(cfg)) + [("vision_config",), ("text_config",), ("quantization",)]
    path = r.choice(paths)
    node = cfg
    for p in path[:-1]:
        node = node[p]
    if kind == 1:
        node.pop(path[-1], None)
        what = "deleted"
    elif kind == 2 and path[-1] == "quantization":
        node["quantization"] = v = r.choice([{"bits": 4, "group_size": 7}, {"bits": 9}, "x",
                                             {"group_size": 64, "bits": 4}])
        what = v
    else:
        node[path[-1]] = v = r.choice(ODD_VALUES)
        what = repr(v)
    (folder / "config.json").write_text(json.dumps(cfg))
    return f"config {'.'.join(path)} = {str(what)[:40]}"


def make_cases(base: Path, root: Path, n: int, seed: int) -> list[tuple[Path, str]]:
    r = random.Random(seed)
    cases = []
    for i in range(n):
        d = root / f"case{i:04d}"
        shutil.copytree(base, d)
        target = r.randrange(3)
        if target == 0:
            shard = d / r.choice(SHARDS)
            data, what = mutate_safetensors(shard.read_bytes(), r)
            shard.write_bytes(data)
            what = f"{shard.name}: {what}"
        elif target == 1:
            what = mutate_index(d, r)
        else:
            what = mutate_config(d, r)
        cases.append((d, what))
    return cases
