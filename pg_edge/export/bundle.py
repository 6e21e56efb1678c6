"""`export_bundle(model_folder, out)`: a folder an app runs with MLX alone, no Python.

    BUNDLE/
      manifest.json        what the files are and how to drive them (see `manifest()`)
      weights.safetensors  every parameter once, as the model holds it (float or quantized)
      encode.mlxfn         pixels -> image features
      prefill.mlxfn        image features + prompt ids -> log-probabilities + KV cache
      decode.mlxfn         one token + cache + position -> log-probabilities + cache
      tokenizer.model      SentencePiece model of the source folder

The graphs take the weights as inputs (pg_edge.export.graphs), so the bundle is the size of the
folder's weights plus a few tens of kB per graph. Each .mlxfn carries the bundle's random id and
the sizes it was traced for (image size, image tokens, prompt lengths, cache length, vocabulary,
cache shape) in its metadata and the manifest holds each file's FNV-1a 64 checksum, so a runner can tell a file
of another bundle (another model) or a damaged file from a good one before MLX parses it.
The bundle is written with pg_edge.checkpoint.folder's atomic_folder (a temporary folder renamed into
place: an interrupted export leaves nothing) and pg_edge.checkpoint.output_check's rule (check_output: never the
model folder, inside it or around it; --force replaces only a pg-edge bundle).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import mlx.core as mx

from ..errors import CheckpointError, PgEdgeError
from ..checkpoint.folder import atomic_folder, quantization_section
from ..checkpoint.output_check import check_output, local_input
from .. import cpu, load
from ..inputs.checks import context_length
from . import graphs

FORMAT = "pg-edge-bundle"
FORMAT_VERSION = 2  # 2: each graph's metadata carries the sizes it was traced for ("shapes")
FUNCTIONS = ("encode", "prefill", "decode")


def fnv1a64(path: Path) -> str:
    """FNV-1a 64 of a file as 16 hex digits: catches damage, not tampering."""
    h = 0xCBF29CE484222325
    data = Path(path).read_bytes()
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def prompt_buckets(num_image_tokens: int, prompt_tokens: int) -> list[int]:
    """Padded prompt lengths prefill is traced for: N + 8, N + 16, ... doubling, up to
    N + prompt_tokens (always included)."""
    text, out = 8, []
    while text < prompt_tokens:
        out.append(num_image_tokens + text)
        text *= 2
    return out + [num_image_tokens + prompt_tokens]


def _dtype(a: mx.array) -> str:
    return str(a.dtype).removeprefix("mlx.core.")


def _spec(name: str, a: mx.array) -> dict:
    return {"name": name, "shape": list(a.shape), "dtype": _dtype(a)}


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def export_bundle(src: str | os.PathLike, out: str | os.PathLike, *, prompt_tokens: int = 64,
                  max_tokens: int = 256, force: bool = False, quiet: bool = True) -> Path:
    """Export the converted folder (or hub id) `src` into the bundle folder `out`.

    prompt_tokens: text tokens a prompt may have after the image tokens (`<bos>` and the "\\n"
    included); max_tokens: generated tokens the cache holds; image tokens + both must fit the
    model's context (max_position_embeddings, 8192), checked before anything is written.
    Returns the bundle path.
    """
    if prompt_tokens < 3:
        raise PgEdgeError(f"--prompt-tokens must be >= 3 (<bos>, a token, \"\\n\"), got {prompt_tokens}")
    if max_tokens < 1:
        raise PgEdgeError(f"--max-tokens must be >= 1, got {max_tokens}")
    check_output(out, force, kind="bundle", inputs=[local_input(src)])
    pg = load(src)
    out = check_output(out, force, kind="bundle", inputs=[pg.folder])  # a hub id's folder too
    # The cache holds image tokens + prompt + generated tokens: within the model's context, or
    # the graphs (and the runner's cache) would be sized past what the model can address.
    n_img, context = pg.config.num_image_tokens, context_length(pg.config)
    if n_img + prompt_tokens + max_tokens > context:
        raise PgEdgeError(f"--prompt-tokens {prompt_tokens} + --max-tokens {max_tokens} + {n_img} image tokens "
                          f"= {n_img + prompt_tokens + max_tokens} is past the model's context of {context} "
                          f"tokens; keep the two at most {context - n_img} together")
    sp_model = pg.folder / "tokenizer.model"
    if not sp_model.is_file():
        raise CheckpointError(f"{pg.folder} has no tokenizer.model: a bundle needs the SentencePiece "
                              "model (the C++ runner tokenizes with SentencePiece, not tokenizer.json)")
    with atomic_folder(out) as tmp:
        _write(pg, tmp, sp_model, prompt_tokens, max_tokens, quiet)
    _say(quiet, f"bundle written: {out}")
    return out


def _write(pg, dst: Path, sp_model: Path, prompt_tokens: int, max_tokens: int, quiet: bool) -> None:
    with cpu.for_tracing():  # tracing: no eval inside the graphs
        _write_traced(pg, dst, sp_model, prompt_tokens, max_tokens, quiet)


def _write_traced(pg, dst: Path, sp_model: Path, prompt_tokens: int, max_tokens: int, quiet: bool) -> None:
    model, config, tok = pg.model, pg.config, pg.tokenizer
    bundle_id = uuid.uuid4().hex
    N = config.num_image_tokens
    P, L = N + prompt_tokens, N + prompt_tokens + max_tokens
    S = config.vision.image_size
    vocab = min(config.real_vocab_size, tok.vocab_size)
    weights = graphs.model_weights(model)
    _say(quiet, f"weights: {len(weights)} tensors -> weights.safetensors")
    mx.save_safetensors(str(dst / "weights.safetensors"), weights,
                        metadata={"format": "mlx", "bundle_id": bundle_id})
    vis = graphs.weight_subset(weights, graphs.VISION_PREFIXES)
    dec = graphs.weight_subset(weights, graphs.DECODER_PREFIXES)

    pixels = mx.zeros((1, S, S, 3), mx.float32)
    ids = mx.full((1, P), tok.pad_id, mx.int32)
    length = mx.array([N + 2], mx.int32)
    token, position = mx.zeros((1, 1), mx.int32), mx.array([N + 2], mx.int32)
    encode = graphs.make_encode(model)
    prefill = graphs.make_prefill(model, L, vocab)
    decode = graphs.make_decode(model, L, vocab)
    # Example outputs (computed with the real weights) give the manifest its shapes and dtypes.
    features = encode(pixels, **vis)[0]
    pre_out = prefill(ids, length, features, **dec)
    cache = pre_out[1:]
    dec_out = decode(token, position, *cache, **dec)
    cache_names = [f"{kind}_{i}" for i in range(len(cache) // 2) for kind in ("keys", "values")]
    calls = {
        "encode": (encode, [("pixels", pixels)], vis, [("features", features)]),
        "prefill": (prefill, [("ids", ids), ("length", length), ("features", features)], dec,
                    [("logprobs", pre_out[0])] + list(zip(cache_names, cache))),
        "decode": (decode, [("token", token), ("position", position)] + list(zip(cache_names, cache)), dec,
                   [("logprobs", dec_out[0])] + list(zip(cache_names, dec_out[1:]))),
    }
    functions = {}
    buckets = prompt_buckets(N, prompt_tokens)
    # The sizes the graphs were traced for, saved inside each (checksummed) graph: a runner
    # checks the manifest's against them before running anything.
    shapes = {"image_size": S, "num_image_tokens": N, "max_prompt_tokens": P, "prompt_lengths": buckets,
              "max_context": L, "vocab_size": vocab, "cache_shape": list(cache[0].shape)}
    for name, (fun, args, w, outs) in calls.items():
        _say(quiet, f"export {name}.mlxfn")
        f = dst / f"{name}.mlxfn"
        meta = json.dumps({"format": FORMAT, "bundle_id": bundle_id, "function": name, "shapes": shapes})
        with mx.exporter(str(f), fun, metadata=meta) as export:
            # prefill: one trace per prompt bucket (the example arrays are the longest's).
            for p in (buckets if name == "prefill" else [None]):
                inputs = [a for _, a in args]
                if p is not None:
                    inputs[0] = mx.full((1, p), tok.pad_id, mx.int32)
                export(*inputs, **w)
        functions[name] = {
            "file": f.name, "fnv1a64": fnv1a64(f), "bytes": f.stat().st_size,
            "inputs": [_spec(n, a) for n, a in args],
            "weight_prefixes": list(graphs.VISION_PREFIXES if w is vis else graphs.DECODER_PREFIXES),
            "outputs": [_spec(n, a) for n, a in outs],
        }
    functions["prefill"]["prompt_lengths"] = buckets
    shutil.copyfile(sp_model, dst / "tokenizer.model")
    manifest = _manifest(pg, bundle_id, weights, functions, P, L, vocab, cache[0])
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def _manifest(pg, bundle_id: str, weights: dict, functions: dict, P: int, L: int, vocab: int,
              cache0: mx.array) -> dict:
    config, tok = pg.config, pg.tokenizer
    N = config.num_image_tokens
    text = config.text
    windows = [layer.window for layer in pg.model.language_model.model.layers]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bundle_id": bundle_id,
        "mlx_version": mx.__version__,
        "model": {
            "source": str(pg.folder),
            "paligemma_version": 2 if config.text.sandwich_norms else 1,  # Gemma2 decoder = PaliGemma 2
            "decoder_layers": text.num_hidden_layers,
            "sliding_windows": windows,
            "quantization": quantization_section(config.raw),
        },
        "weights": {
            "file": "weights.safetensors",
            "tensors": {k: {"shape": list(v.shape), "dtype": _dtype(v)} for k, v in sorted(weights.items())},
        },
        "tokenizer": {
            "file": "tokenizer.model", "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
            "image_id": tok.image_id, "newline_ids": list(tok.newline_ids), "vocab_size": vocab,
            "loc0_id": tok.loc0, "seg0_id": tok.seg0,
        },
        "image": {
            "size": config.vision.image_size,
            "resize": "PIL Image.resize BICUBIC to size x size (antialiased, a = -0.5), aspect ratio not kept",
            "orientation": "files are first turned upright by their EXIF orientation",
            "alpha": "composited onto white before the resize",
            "normalize": "x / 255 then (x - 0.5) / 0.5, float32, NHWC",
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
        },
        "prompt": {
            "layout": ["<image> x num_image_tokens", "<bos>", "SentencePiece(prefix)", "newline_ids"],
            "num_image_tokens": N,
            "max_prompt_tokens": P,
            "padding": "right-padded with pad_id to the smallest of functions.prefill.prompt_lengths "
                       "that holds it (max_prompt_tokens is the largest); `length` = real tokens",
        },
        "cache": {
            "kind": "fixed",
            "max_context": L,
            "layers": text.num_hidden_layers,
            "shape": list(cache0.shape),
            "dtype": _dtype(cache0),
            "order": "keys_0, values_0, keys_1, values_1, ...",
            "rule": "prefill fills positions 0..P-1 (P: the padded prompt length); decode writes "
                    "`position` and attends to positions <= position (and within the window on "
                    "sliding layers)",
        },
        "mask": "prefix-LM: the whole prompt is the bidirectional prefix (every query sees every "
                "real key, window or not); generated tokens are causal and see the whole prefix "
                "unless a sliding window cuts it",
        "generation": "greedy: argmax of logprobs (real vocabulary only); stop at eos_id or when "
                      "position reaches max_context",
        "functions": functions,
    }
