"""`explain`: one generation, stage by stage, with the shapes and numbers of this very input.

    pg = pg_edge.load("demo")
    ex = explain(pg, "pg_edge/demo/samples/shapes_3.png", "detect circle", top_k=3)
    print(ex.to_text())          # what `pg-edge explain` prints
    ex.save("explain_out")       # input.png, layout.png, mask*.png, answer.png

Nothing here computes the model a second way. It calls what `PaliGemma.generate` calls, in the
same order: the processor (`pg.prepare`), the context checks, `pg.image_features` (SigLIP and the
connector, with taps on their modules to see the shapes going through), then mlx-lm-style
`generate_step` under the eos loop `until_eos`, keeping the log-probabilities each step computes
anyway. The attention mask is the one `PaliGemmaModel.masks` builds (the builder the model runs,
prefill and training alike) for the whole sequence, prompt + answer, as training would see it;
the model is then run once over that sequence with that mask (teacher forcing) and its choice at
every answer position is compared with what generation chose: the picture is the mask the numbers
came from. Detection and segmentation answers are parsed and drawn by pg_edge.tasks.parse /
pg_edge.model.vae / pg_edge.tasks.draw, as `pg-edge detect` / `segment` do.

The taps replace the vision modules of `pg.model` for the duration of the vision call only (and
put them back, also on an error); another thread using the same `pg` meanwhile runs through them
unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import calls, explain_draw, parse
from ..errors import PgEdgeError
from ..generate import GREEDY, generate_step, until_eos, vocab_mask
from ..inputs.images import ImageInput, load_image, to_rgb
from ..inputs.checks import check_context, check_max_tokens, context_length
from ..model.vae import add_masks

__all__ = ["explain", "Explanation", "Token", "Step", "Tap"]


class Tap(nn.Module):
    """Stands in for a child module during one call: runs it and keeps the shape and a few
    statistics of what it returned. Attribute reads fall through to the wrapped module."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.seen: list[dict] = []

    def __getattr__(self, key):
        if key in self:
            return self[key]
        if "inner" not in self:
            raise AttributeError(key)
        return getattr(self["inner"], key)

    def __call__(self, *args, **kwargs):
        out = self["inner"](*args, **kwargs)
        x = out.astype(mx.float32)
        self.seen.append({"shape": list(out.shape), "dtype": str(out.dtype).replace("mlx.core.", ""),
                          "mean": float(x.mean()), "std": float(mx.sqrt(x.var())),
                          "rms": float(mx.sqrt((x * x).mean()))})
        return out


class taps:
    """`with taps(parent, "child", ...) as seen:` wraps each named child module in a Tap for the
    block and puts the originals back after; `seen[name]` lists what each call returned."""

    def __init__(self, *where: tuple[nn.Module, str]):
        self.where = where
        self.seen: dict[str, list[dict]] = {}

    def __enter__(self):
        for parent, name in self.where:
            tap = Tap(getattr(parent, name))
            setattr(parent, name, tap)
            self.seen[name] = tap.seen
        return self.seen

    def __exit__(self, *exc):
        for parent, name in self.where:
            setattr(parent, name, getattr(parent, name)["inner"])
        return False


@dataclass
class Token:
    """One position of the sequence: kind is image / bos / prompt / separator / answer / eos;
    block is "prefix" (attends both ways) or "suffix" (causal)."""

    position: int
    id: int
    piece: str
    kind: str
    block: str


@dataclass
class Step:
    """One generated token: its probability and the top-k candidates (id, piece, probability)
    of the distribution it was chosen from (softcapped, past-vocabulary ids excluded)."""

    position: int
    id: int
    piece: str
    prob: float
    top: list[tuple[int, str, float]]


@dataclass
class Explanation:
    """Everything `explain` saw. Shapes are lists as MLX reported them; masks are
    bool[T, T] per sliding window (None = global layers), True = the row's token attends to
    the column's."""

    model: str
    prompt: str
    image: object  # the original PIL image
    pixel_values: np.ndarray  # float32[1, S, S, 3]
    vision: dict  # patch, grid, conv/tower/connector shapes and stats
    decoder: dict
    tokens: list[Token]
    steps: list[Step]
    masks: dict
    text: str
    finish_reason: str
    teacher_forced: dict | None  # None when explain ran with check=False
    objects: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    note: str = ""

    @property
    def prefix_length(self) -> int:
        return sum(t.block == "prefix" for t in self.tokens)

    def to_text(self) -> str:
        return explain_draw.report(self)

    def save(self, folder, inputs=()) -> list[Path]:
        """Write the pictures into `folder` (created); returns the paths written. Refused
        (PgEdgeError) when `folder` is, holds or lies in one of `inputs` (paths) or holds a
        picture of the same name that pg-edge did not draw (pg_edge.tasks.explain_draw.check_folder)."""
        explain_draw.check_folder(folder, list(inputs))
        return explain_draw.save_all(self, Path(folder))


def explain(pg, image: ImageInput, prompt: str, *, max_tokens: int = 32, top_k: int = 5,
            vae=None, check: bool = True) -> Explanation:
    """Run one greedy generation of `pg` (a pg_edge.PaliGemma) on (image, prompt) and record
    every stage; see the module docstring. top_k: candidates kept per generated token (1..20).
    vae: mask decoder for a `segment` prompt (default: the model folder's, when present).
    check: run the teacher-forced pass over the whole sequence with the drawn mask (one more
    prefill's worth of compute; off for a quick look at a large model)."""
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 20:
        raise PgEdgeError(f"top_k must be an integer from 1 to 20, got {top_k!r}")
    max_tokens = check_max_tokens(max_tokens)
    model, config, tok = pg.model, pg.config, pg.tokenizer
    original = to_rgb(load_image(image))
    # -- what PaliGemma._start does, step by step: processor, context check, image features
    inp = pg.prepare([original], [prompt])
    T_prompt = int(inp.input_ids.shape[1])
    check_context(T_prompt, max_tokens, context_length(config), config.num_image_tokens)
    emb = model.vision_tower.vision_model.embeddings
    with taps((emb, "patch_embedding"), (model, "vision_tower"), (model, "multi_modal_projector")) as seen:
        feats = pg.image_features(inp.pixel_values)
    if not seen["vision_tower"]:  # the pipeline had these pixels cached: run the encoder for the record
        with taps((emb, "patch_embedding"), (model, "vision_tower"), (model, "multi_modal_projector")) as seen:
            mx.eval(model.encode_image(mx.array(inp.pixel_values)))
    ids = mx.array(inp.input_ids)

    # -- generation: layer 1 (generate_step) under the eos loop, the log-probs kept per step
    eos = tok.eos_id
    kept: list[tuple[int, np.ndarray]] = []

    def keep(steps):
        for t, logprobs in steps:
            kept.append((int(t[0]), np.array(logprobs[0].astype(mx.float32))))
            yield t, logprobs

    steps = generate_step(model, ids, feats, sampler=GREEDY.sampler(config.real_vocab_size),
                          max_tokens=max_tokens)
    answer = []
    for (t,) in until_eos(keep(steps), eos):
        if t is None:
            break
        answer.append(t)
    finish = "stop" if kept and kept[-1][0] == eos else "length"
    text = tok.decode(answer)

    tokens = _layout(tok, prompt, inp.input_ids[0].tolist(), config.num_image_tokens,
                     [t for t, _ in kept], eos)
    full = [t.id for t in tokens]
    mask_ar = mx.array([[0 if t.block == "prefix" else 1 for t in tokens]], dtype=mx.int32)
    built = model.masks(mask_ar, mx.ones(mask_ar.shape, dtype=mx.bool_), 1, len(full))
    masks = {w: np.array(m[0, 0]) for w, m in built.items()}
    teacher = (_teacher_forced(model, full, feats, mask_ar, T_prompt, kept, config.real_vocab_size)
               if check else None)
    out_steps = [_step(tok, T_prompt + i, t, lp, top_k) for i, (t, lp) in enumerate(kept)]

    vision = _vision_record(config, seen, inp.pixel_values)
    decoder = _decoder_record(model, config, ids, feats, T_prompt)
    ex = Explanation(model=str(pg.folder or "model"), prompt=prompt, image=original,
                     pixel_values=inp.pixel_values, vision=vision, decoder=decoder, tokens=tokens,
                     steps=out_steps, masks=masks, text=text, finish_reason=finish, teacher_forced=teacher)
    _parse_answer(ex, pg, vae)
    return ex


def _layout(tok, prompt: str, prompt_ids: list[int], n_image: int, generated: list[int], eos: int) -> list[Token]:
    """The sequence as the processor laid it out (`<image>` x N, `<bos>`, prompt, separator),
    then the generated tokens; checked against the ids the processor really produced."""
    text_ids = tok.encode(prompt)
    kinds = (["image"] * n_image + ["bos"] + ["prompt"] * len(text_ids) + ["separator"] * len(tok.newline_ids))
    expect = [tok.image_id] * n_image + [tok.bos_id] + text_ids + list(tok.newline_ids)
    if expect != prompt_ids:  # the processor's layout changed: this table would lie
        raise AssertionError("the processor's prompt layout is not <image> x N, <bos>, prompt, \\n")
    rows = [Token(i, t, _piece(tok, t), k, "prefix") for i, (t, k) in enumerate(zip(prompt_ids, kinds))]
    for j, t in enumerate(generated):
        rows.append(Token(len(prompt_ids) + j, t, _piece(tok, t), "eos" if t == eos else "answer", "suffix"))
    return rows


def _piece(tok, i: int) -> str:
    if i == tok.image_id:
        return "<image>"
    return tok.piece(i) if 0 <= i < tok.vocab_size else f"<id {i}>"


def _step(tok, position: int, t: int, logprobs: np.ndarray, k: int) -> Step:
    probs = np.exp(logprobs.astype(np.float64))
    order = np.argsort(-logprobs, kind="stable")[:k]
    return Step(position, t, _piece(tok, t), float(probs[t]),
                [(int(i), _piece(tok, int(i)), float(probs[i])) for i in order])


def _teacher_forced(model, full: list[int], feats, mask_ar, T_prompt: int, kept, limit: int) -> dict:
    """One pass over prompt + answer with the drawn masks (`model(..., mask_ar=...)`): at each
    answer position the argmax and the log-probabilities against what generation computed."""
    if not kept:
        return {"positions": 0, "same_choice": True, "max_abs_logprob_diff": 0.0}
    logits = model(mx.array([full]), image_features=feats, mask_ar=mask_ar,
                   valid=mx.ones(mask_ar.shape, dtype=mx.bool_), logits_from=T_prompt - 1)[0, :len(kept)]
    lg = logits.astype(mx.float32) + vocab_mask(logits.shape[-1], limit)
    lp = np.array(lg - mx.logsumexp(lg, axis=-1, keepdims=True))
    gen = np.stack([g for _, g in kept])
    finite = np.isfinite(gen) & np.isfinite(lp)  # ids past the vocabulary are -inf on both sides
    return {"positions": len(kept),
            "same_choice": bool((lp.argmax(-1) == np.array([t for t, _ in kept])).all()),
            "max_abs_logprob_diff": float(np.abs(lp[finite] - gen[finite]).max())}


def _vision_record(config, seen: dict, pixels: np.ndarray) -> dict:
    v = config.vision
    grid = v.image_size // v.patch_size
    return {
        "image_size": v.image_size, "patch_size": v.patch_size, "grid": grid, "patches": grid * grid,
        "patch_values": v.patch_size * v.patch_size * v.num_channels,
        "pixels": {"shape": list(pixels.shape), "min": float(pixels.min()), "max": float(pixels.max()),
                   "mean": float(pixels.mean()), "std": float(pixels.std())},
        "patch_conv": seen["patch_embedding"][0], "siglip": seen["vision_tower"][0],
        "connector": seen["multi_modal_projector"][0],
        "width": v.hidden_size, "layers": v.num_hidden_layers, "heads": v.num_attention_heads,
        "mlp": v.intermediate_size, "position_embeddings": [grid * grid, v.hidden_size],
    }


def _decoder_record(model, config, ids, feats, T_prompt: int) -> dict:
    """The decoder's shape, and its input: `model.embed` (what every forward pass starts with)
    on the prompt, with the RMS of image rows (the connector's output, unscaled) and of text
    rows (embeddings x sqrt(D))."""
    t = config.text
    h = model.embed(ids, feats).astype(mx.float32)[0]
    rms = mx.sqrt((h * h).mean(axis=-1))
    n = config.num_image_tokens
    layers = model.language_model.model.layers
    return {
        "kind": "Gemma2" if t.sandwich_norms else "Gemma", "width": t.hidden_size, "layers": t.num_hidden_layers,
        "heads": t.num_attention_heads, "kv_heads": t.num_key_value_heads, "head_dim": t.head_dim,
        "mlp": t.intermediate_size, "vocab": config.real_vocab_size, "embedding_rows": t.vocab_size,
        "windows": [layer.window for layer in layers],
        "attn_softcap": t.attn_logit_softcapping, "final_softcap": t.final_logit_softcapping,
        "text_scale": math.sqrt(t.hidden_size), "embed_shape": [1, T_prompt, t.hidden_size],
        "image_rms": float(rms[:n].mean()), "text_rms": float(rms[n:].mean()),
    }


def _parse_answer(ex: Explanation, pg, vae) -> None:
    """detect / segment prompts: objects parsed from the answer (boxes in the original image's
    pixels), masks decoded when a mask decoder is at hand."""
    task = ex.prompt.strip().split(" ", 1)[0]
    if task not in ("detect", "segment"):
        return
    parsed = parse.parse_objects(ex.text, ex.image.size, ex.prompt)
    ex.objects, ex.skipped = parsed.objects, parsed.skipped
    if task == "segment" and any(o.seg is not None for o in ex.objects):
        try:
            decoder = calls.find_vae(pg, vae)
        except PgEdgeError as err:
            ex.note = f"masks not drawn: {err}"
            return
        ex.objects = add_masks(ex.objects, decoder, ex.image.size)
