"""What `pg_edge.tasks.explain` shows: the terminal report and the pictures.

    input.png        the pixels the model sees (S x S, de-normalised) with the patch grid
    layout.png       the token sequence, coloured by kind, each token's block (prefix / suffix)
    mask.png         the attention mask of this input (global layers); mask_windowW.png for
                     Gemma2's sliding layers when the window W cuts into this sequence
    answer.png       detect / segment answers: boxes, labels, masks on the original image

Each is saved atomically and marked as drawn by pg-edge, so a later run may replace it and
nothing else (`check_folder`, pg_edge.checkpoint.output_check).

A mask picture is a grid of T x T cells of `scale` pixels, row i = the query token, column j
= the key token, after a band on the top and left edge coloured by token kind. Its PNG text
chunk "pg_edge.mask" (JSON: tokens, scale, origin, window) says where the grid lies, so
`read_mask_picture` gives back the bool[T, T] it was drawn from (tests compare that with the
model's mask builder).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from ..checkpoint.atomic import atomic_file
from .draw import draw_objects
from ..errors import PgEdgeError
from ..checkpoint.output_check import DRAWN_BY, check_output, inputs_overlap

PREFIX_ATTEND = (0, 130, 200)  # prefix query -> prefix key: both ways
SUFFIX_ATTEND = (245, 130, 48)  # suffix query -> any key it sees
BLOCKED = (245, 245, 245)  # may not attend
WINDOW_CUT = (250, 200, 210)  # would attend in a global layer, outside this layer's window
KIND_COLORS = {"image": (60, 180, 75), "bos": (145, 30, 180), "prompt": (0, 128, 128),
               "separator": (240, 50, 230), "answer": (245, 130, 48), "eos": (128, 0, 0)}
BAND = 12  # pixels of the kind band on the top and left edges
MASK_KEY = "pg_edge.mask"


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def mask_picture(mask: np.ndarray, kinds: list[str], prefix_len: int, full: np.ndarray | None = None,
                 window: int | None = None) -> tuple[Image.Image, str]:
    """bool[T, T] -> (picture, the JSON to save as its MASK_KEY PNG text). `full`: the global
    layers' mask, to show in WINDOW_CUT what the window takes away."""
    T = mask.shape[0]
    k = max(1, min(12, 720 // T))
    legend = 5 * 16 + 8
    side = BAND + T * k
    img = Image.new("RGB", (max(side, 420), side + legend), (255, 255, 255))
    grid = np.empty((T, T, 3), dtype=np.uint8)
    grid[:] = BLOCKED
    if full is not None:
        grid[full & ~mask] = WINDOW_CUT
    rows = np.arange(T)[:, None] < prefix_len
    grid[mask & rows] = PREFIX_ATTEND
    grid[mask & ~rows] = SUFFIX_ATTEND
    img.paste(Image.fromarray(np.repeat(np.repeat(grid, k, 0), k, 1)), (BAND, BAND))
    draw = ImageDraw.Draw(img)
    for i, kind in enumerate(kinds):
        c = KIND_COLORS[kind]
        draw.rectangle([BAND + i * k, 0, BAND + (i + 1) * k - 1, BAND - 2], fill=c)
        draw.rectangle([0, BAND + i * k, BAND - 2, BAND + (i + 1) * k - 1], fill=c)
    font, y = _font(), side + 6
    title = f"attention mask, {T} x {T} tokens" + (f", sliding window {window}" if window else "")
    lines = [(title, (0, 0, 0)), ("blue: prefix <-> prefix (both ways)", PREFIX_ATTEND),
             ("orange: suffix token sees prefix + earlier suffix", SUFFIX_ATTEND)]
    lines.append(("pink: outside the window" if window else "grey: masked (rows = queries, columns = keys)",
                  (200, 90, 130) if window else (120, 120, 120)))
    lines.append(("edges: image green, <bos> purple, prompt teal, \\n magenta, answer orange", (80, 80, 80)))
    for text, color in lines:
        draw.text((4, y), text, fill=color, font=font)
        y += 16
    return img, json.dumps({"tokens": T, "scale": k, "origin": [BAND, BAND], "window": window})


def read_mask_picture(path) -> np.ndarray:
    """The bool[T, T] mask a `mask_picture` PNG shows (the centre pixel of each cell)."""
    img = Image.open(path)
    meta = json.loads(img.text[MASK_KEY])
    T, k, (x0, y0) = meta["tokens"], meta["scale"], meta["origin"]
    px = np.asarray(img.convert("RGB"))
    centres = px[y0 + np.arange(T) * k + k // 2][:, x0 + np.arange(T) * k + k // 2]
    return (np.all(centres == PREFIX_ATTEND, axis=-1) | np.all(centres == SUFFIX_ATTEND, axis=-1))


def layout_picture(tokens) -> Image.Image:
    """The token sequence as coloured boxes (the image tokens as one box), wrapped into rows;
    a strip on each box's top edge marks its block: blue prefix, orange suffix."""
    font = _font(13)
    groups, i = [], 0
    while i < len(tokens):
        j = i
        while tokens[i].kind == "image" and j + 1 < len(tokens) and tokens[j + 1].kind == "image":
            j += 1
        t = tokens[i]
        label = f"<image> x{j - i + 1}" if t.kind == "image" else _show(t.piece)
        where = f"{i}-{j}" if j > i else f"{i}"
        groups.append((label, where, t.kind, t.block))
        i = j + 1
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [max(probe.textlength(g[0], font=font), probe.textlength(g[1], font=font)) + 12 for g in groups]
    width, x, y, places = 960, 8, 30, []
    for w in widths:
        if x + w > width - 8:
            x, y = 8, y + 54
        places.append((x, y))
        x += w + 4
    img = Image.new("RGB", (width, y + 62), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((8, 6), "prefix (attends both ways)", fill=PREFIX_ATTEND, font=font)
    draw.text((240, 6), "suffix (causal)", fill=SUFFIX_ATTEND, font=font)
    for (label, where, kind, block), w, (x, y) in zip(groups, widths, places):
        draw.rectangle([x, y, x + w, y + 44], fill=KIND_COLORS[kind])
        draw.rectangle([x, y, x + w, y + 4], fill=PREFIX_ATTEND if block == "prefix" else SUFFIX_ATTEND)
        draw.text((x + 6, y + 8), label, fill=(255, 255, 255), font=font)
        draw.text((x + 6, y + 26), where, fill=(235, 235, 235), font=font)
    return img


def input_picture(pixel_values: np.ndarray, patch: int) -> Image.Image:
    """float32[1, S, S, 3] in [-1, 1] -> the RGB picture the model sees, enlarged to at least
    448 px, with the patch grid drawn."""
    x = np.clip(np.rint((pixel_values[0] * 0.5 + 0.5) * 255), 0, 255).astype(np.uint8)
    S = x.shape[0]
    k = max(1, -(-448 // S))
    img = Image.fromarray(np.repeat(np.repeat(x, k, 0), k, 1))
    draw = ImageDraw.Draw(img)
    for p in range(0, S + 1, patch):
        draw.line([(p * k, 0), (p * k, S * k)], fill=(60, 60, 60))
        draw.line([(0, p * k), (S * k, p * k)], fill=(60, 60, 60))
    return img


PICTURES = re.compile(r"^(input|layout|mask|mask_window\d+|answer)\.png$")  # what save_all writes


def check_folder(folder, inputs) -> None:
    """Before anything runs: `folder` may hold only what an earlier explain drew under the names
    save_all writes (pg_edge.checkpoint.output_check: never an input, never a picture pg-edge did not draw)."""
    folder = Path(folder)
    inputs_overlap(folder, inputs)
    if os.path.lexists(folder) and not folder.is_dir():
        raise PgEdgeError(f"the output {folder} exists and is not a folder; give a folder for the pictures")
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if PICTURES.match(p.name):
                check_output(p, True, kind="drawing", inputs=inputs)


def save_all(ex, folder: Path) -> list[Path]:
    """Each picture saved atomically, PNG marked as drawn by pg-edge (pg_edge.checkpoint.output_check)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []

    def save(img, name, text: dict | None = None):
        info = PngImagePlugin.PngInfo()
        info.add_text("Software", DRAWN_BY)
        for k, v in (text or {}).items():
            info.add_text(k, v)
        with atomic_file(folder / name) as tmp:
            img.save(tmp, format="PNG", pnginfo=info)
        out.append(folder / name)

    save(input_picture(ex.pixel_values, ex.vision["patch_size"]), "input.png")
    save(layout_picture(ex.tokens), "layout.png")
    kinds, full = [t.kind for t in ex.tokens], ex.masks.get(None)
    for window, mask in sorted(ex.masks.items(), key=lambda kv: kv[0] or 0):
        if window is not None and full is not None and np.array_equal(mask, full):
            continue  # a window longer than this sequence: the same picture as mask.png
        img, meta = mask_picture(mask, kinds, ex.prefix_length, full if window else None, window)
        save(img, "mask.png" if window is None else f"mask_window{window}.png", {MASK_KEY: meta})
    if ex.objects:
        save(draw_objects(ex.image, ex.objects), "answer.png")
    return out


def _show(piece: str) -> str:
    """A piece printable in one cell: SentencePiece's word-start mark as a space, except in a
    piece that is nothing else (shown as the mark)."""
    if piece.strip("\u2581") == "":
        return piece or "''"
    return piece.replace("\n", "\\n").replace("\u2581", " ")[:14]


def _shape(s) -> str:
    return f"{s['dtype']}[{', '.join(map(str, s['shape']))}]"


def report(ex) -> str:
    """The terminal text of an Explanation."""
    v, d = ex.vision, ex.decoder
    w, h = ex.image.size
    px = v["pixels"]
    n_img, P = v["patches"], ex.prefix_length
    windows = sorted({x for x in d["windows"] if x})
    L = [f"pg-edge explain: {ex.model}, prompt {ex.prompt!r}", "",
         f"1. image: {w}x{h} -> {v['image_size']}x{v['image_size']} (bicubic, aspect ratio not kept), "
         f"x / 255, then (x - mean) / std with mean 0.5, std 0.5",
         f"   pixels float32[{', '.join(map(str, px['shape']))}] in [{px['min']:.3f}, {px['max']:.3f}], "
         f"mean {px['mean']:.3f}, std {px['std']:.3f}",
         f"2. SigLIP: {v['patch_size']}x{v['patch_size']} px patches, {v['grid']}x{v['grid']} grid = "
         f"{v['patches']} patches of {v['patch_values']} values",
         f"   patch conv -> {_shape(v['patch_conv'])}, + position embeddings [{v['position_embeddings'][0]}, "
         f"{v['position_embeddings'][1]}] (one row per grid cell)",
         f"   {v['layers']} encoder layers (width {v['width']}, {v['heads']} heads, MLP {v['mlp']}), "
         f"final LayerNorm -> {_shape(v['siglip'])}, mean {v['siglip']['mean']:.3f}, std {v['siglip']['std']:.3f}",
         f"3. connector: Linear({v['width']} -> {d['width']}, bias) on every patch -> image features "
         f"{_shape(v['connector'])}",
         f"   decoder input {d['embed_shape']}: image rows as they are (RMS {d['image_rms']:.3f}), "
         f"text rows = embedding x sqrt({d['width']}) = x {d['text_scale']:.2f} (RMS {d['text_rms']:.3f})",
         f"4. decoder: {d['kind']}, {d['layers']} layers, width {d['width']}, {d['heads']} query / "
         f"{d['kv_heads']} key-value heads of {d['head_dim']}, MLP {d['mlp']}, vocabulary {d['vocab']} "
         f"(embedding rows {d['embedding_rows']})"
         + (f"; softcaps {d['attn_softcap']:g} / {d['final_softcap']:g}" if d["final_softcap"] else ""),
         f"   sliding window {', '.join(map(str, windows))} on layers "
         f"{', '.join(str(i) for i, x in enumerate(d['windows']) if x)}" if windows else "   every layer global",
         "", f"5. token layout: {P} prefix tokens ({n_img} image, <bos>, "
         f"{sum(t.kind == 'prompt' for t in ex.tokens)} prompt, separator), "
         f"{len(ex.tokens) - P} suffix (generated)",
         f"   {'pos':>9}  {'id':>7}  {'piece':<16} {'kind':<10} block"]
    for t in ex.tokens:
        if t.kind == "image" and t.position > 0:
            continue
        pos = f"0-{n_img - 1}" if t.kind == "image" else str(t.position)
        piece = f"<image> x{n_img}" if t.kind == "image" else _show(t.piece)
        L.append(f"   {pos:>9}  {t.id:>7}  {piece:<16} {t.kind:<10} {t.block}")
    T = len(ex.tokens)
    L += ["", f"6. attention mask ({T} x {T}, built by PaliGemmaModel.masks): prefix rows see all {P} "
          f"prefix tokens, suffix row i sees the prefix and suffix tokens up to i"]
    for window, mask in sorted(ex.masks.items(), key=lambda kv: kv[0] or 0):
        name = "global layers" if window is None else f"window {window} layers"
        same = window is not None and None in ex.masks and np.array_equal(mask, ex.masks[None])
        L.append(f"   {name}: {int(mask.sum())} of {T * T} pairs attend"
                 + (" (the window is longer than this sequence: as global)" if same else ""))
    tf = ex.teacher_forced
    if tf is not None:
        L.append(f"   one pass over all {T} tokens with this mask picks the generated token at "
                 f"{'every' if tf['same_choice'] else 'NOT every'} one of {tf['positions']} answer positions "
                 f"(max |log p difference| {tf['max_abs_logprob_diff']:.2e} vs the cached generation)")
    k = len(ex.steps[0].top) if ex.steps else 0
    L += ["", f"7. generation (greedy): {len(ex.steps)} tokens, {ex.finish_reason}; top {k} candidates each",
          f"   {'pos':>5}  {'token':<16} {'p':>6}   candidates"]
    for s in ex.steps:
        cands = "  ".join(f"{_show(p)} {q:.3f}" for _, p, q in s.top)
        L.append(f"   {s.position:>5}  {_show(s.piece):<16} {s.prob:>6.3f}   {cands}")
    L += ["", f"8. answer: {ex.text!r}"]
    for o in ex.objects:
        box = ", ".join(f"{x:.1f}" for x in o.box)
        mask = f", mask {int(o.mask.sum())} px" if o.mask is not None else ""
        L.append(f"   {o.label or '(no label)'}: bins (y1, x1, y2, x2) {o.loc} -> box (x1, y1, x2, y2) "
                 f"[{box}] px of the {w}x{h} image{mask}")
    for s in ex.skipped:
        L.append(f"   skipped {s.text!r}: {s.reason}")
    if ex.note:
        L.append(f"   {ex.note}")
    return "\n".join(L)
