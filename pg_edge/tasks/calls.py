"""The PaliGemma tasks as calls on a loaded model: prompt -> generate -> parse -> (masks), and
their outputs as JSON (masks as COCO RLE: `mask_to_rle` / `rle_to_mask`). The text side,
prompts and parsing with no model, is pg_edge/prompts.py.

    pg = pg_edge.load("paligemma2-3b-mix-448")
    caption(pg, "cat.jpg").text                      # "a cat sleeping on a red blanket"
    ask(pg, "cat.jpg", "what colour is the cat?").text
    r = detect(pg, "cat.jpg", "cat ; dog")           # r.objects[0].box = (x1, y1, x2, y2) px
    r = segment(pg, "cat.jpg", "cat", vae="vae.safetensors")   # r.objects[0].mask: bool[H, W]
    json.dumps(to_json(r))                           # boxes in pixels, masks as COCO RLE

Each function takes the `PaliGemma` object (anything with `.generate(image, prompt, **gen)`
returning a GenerationResult, and `.folder`), so it can be attached as a method one-to-one.
`**gen` are the generation settings: max_tokens, and `sampling=Sampling(...)` or its fields
(temperature, top_p, top_k, seed) as keywords.

Boxes are in pixels of the ORIGINAL image (the model sees a square resize; the parser maps the
1024 bins back through the original width and height), see pg_edge/prompts.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import parse, prompts
from ..checkpoint.folder import VAE_FILE
from ..errors import PgEdgeError
from ..generate import GenerationResult
from ..inputs.images import ImageInput, load_image, to_rgb
from .parse import DetectedObject, Skipped



@dataclass
class TaskResult:
    """What one task call produced.

    text: the generated text without eos or a prompt echo (loc/seg tokens kept for detect and
    segment). objects: parsed objects (empty for caption/ocr/ask), boxes in original pixels,
    masks bool[H, W] after segment; for detect/segment only those whose label is one of the
    names asked for. unmatched: the parsed objects labelled with anything else (no masks).
    skipped: malformed output pieces with the reason. image_size: (width, height) of the
    original image. generation: the raw GenerationResult (finish_reason "length": the answer
    was cut off at max_tokens, see `truncated`).
    """

    task: str
    prompt: str
    text: str
    image_size: tuple[int, int]
    generation: GenerationResult
    objects: list[DetectedObject] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    unmatched: list[DetectedObject] = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        """The generation stopped at its token limit, not at `<eos>`: objects may be missing."""
        return self.generation is not None and self.generation.finish_reason == "length"


def _image(image: ImageInput):
    """Decode once: the size is needed for the boxes, and pg.generate takes the decoded image."""
    img = load_image(image)
    return img, (int(img.size[0]), int(img.size[1]))


def _text_task(pg, task: str, image: ImageInput, prompt: str, gen: dict) -> TaskResult:
    img, size = _image(image)
    result = pg.generate(img, prompt, **gen)
    return TaskResult(task, prompt, parse.clean_output(result.text, prompt), size, result)


def caption(pg, image: ImageInput, lang: str = "en", **gen) -> TaskResult:
    """`caption {lang}`: a short caption."""
    return _text_task(pg, "caption", image, prompts.caption(lang), gen)


def ocr(pg, image: ImageInput, **gen) -> TaskResult:
    """`ocr`: the text in the image."""
    return _text_task(pg, "ocr", image, prompts.ocr(), gen)


def ask(pg, image: ImageInput, question: str, lang: str = "en", **gen) -> TaskResult:
    """`answer {lang} {question}`: visual question answering."""
    return _text_task(pg, "ask", image, prompts.answer(question, lang), gen)


def _object_task(pg, task: str, image: ImageInput, objects, gen: dict) -> TaskResult:
    img, size = _image(image)
    prompt = (prompts.detect if task == "detect" else prompts.segment)(objects)
    result = pg.generate(img, prompt, **gen)
    parsed = parse.parse_objects(result.text, size, prompt)
    asked, unmatched = parse.split_asked(parsed.objects, prompts.object_names(objects))
    return TaskResult(task, prompt, parse.clean_output(result.text, prompt), size, result,
                      asked, parsed.skipped, unmatched)


def detect(pg, image: ImageInput, objects: str | Sequence[str], **gen) -> TaskResult:
    """`detect a ; b`: one box per found instance (`objects` is "cat ; dog" or a list). Objects
    the model labels with a name not asked for go to `.unmatched`, not `.objects`."""
    return _object_task(pg, "detect", image, objects, gen)


def find_vae(pg, vae=None):
    """The mask decoder: `vae` as a loaded MaskDecoder or a path, else `vae.safetensors` in the
    model folder. Raises PgEdgeError saying how to get one."""
    from ..model.vae import MaskDecoder, load_mask_decoder

    if isinstance(vae, MaskDecoder):
        return vae
    if vae is None:
        folder = getattr(pg, "folder", None)
        candidate = Path(folder) / VAE_FILE if folder is not None else None
        if candidate is None or not candidate.is_file():
            raise PgEdgeError(
                "segment needs the mask decoder: pass vae=PATH (--vae), or save it as "
                f"{VAE_FILE} in the model folder; make it from big_vision's vae-oid.npz with "
                "`pg-edge convert-vae vae-oid.npz -o vae.safetensors`")
        vae = candidate
    if not Path(vae).is_file():
        raise PgEdgeError(f"mask decoder not found: {vae}")
    return load_mask_decoder(vae)


def segment(pg, image: ImageInput, objects: str | Sequence[str], vae=None, masks=None, **gen) -> TaskResult:
    """`segment a ; b`: a box and a bool[H, W] mask per found instance.

    vae: a MaskDecoder, a path to one (made by `pg-edge convert-vae`), or None for
    `vae.safetensors` in the model folder. It is loaded before generating, so a missing
    decoder fails fast. masks: how to call the mask decoding (`masks(fn, *args)`; PaliGemma
    passes its worker's `call`, so the decoder's MLX work runs with the model's).
    """
    from ..model.vae import add_masks

    decoder = find_vae(pg, vae)
    result = _object_task(pg, "segment", image, objects, gen)
    run = masks or (lambda fn, *args: fn(*args))
    result.objects = run(add_masks, result.objects, decoder, result.image_size)
    return result


def mask_to_rle(mask) -> dict:
    """bool[H, W] -> {"size": [H, W], "counts": [...]}, COCO's uncompressed RLE.

    Runs over the column-major (Fortran order) flattening, alternating 0s and 1s and always
    starting with a run of 0s (of length 0 when the first pixel is set).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise PgEdgeError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    height, width = mask.shape
    flat = mask.astype(bool).ravel(order="F")
    if flat.size == 0:
        return {"size": [int(height), int(width)], "counts": []}
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], starts, [flat.size]])).tolist()
    if flat[0]:
        counts.insert(0, 0)
    return {"size": [int(height), int(width)], "counts": [int(c) for c in counts]}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Inverse of `mask_to_rle`: {"size": [H, W], "counts": [...]} -> bool[H, W]."""
    try:
        height, width = (int(v) for v in rle["size"])
        counts = np.asarray(rle["counts"], dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        raise PgEdgeError("RLE must be {'size': [H, W], 'counts': [ints]} (uncompressed)") from None
    if counts.ndim != 1 or (counts < 0).any():
        raise PgEdgeError("RLE counts must be a flat list of non-negative integers")
    if counts.sum() != height * width:
        raise PgEdgeError(f"RLE counts sum to {counts.sum()}, size {height}x{width} needs "
                          f"{height * width}")
    values = np.arange(counts.size) % 2 == 1  # runs alternate 0, 1, 0, ...
    return np.repeat(values, counts).reshape((height, width), order="F")


def to_json(result: TaskResult) -> dict:
    """A JSON-ready dict: boxes [x1, y1, x2, y2] in original-image pixels (float, 2 decimals),
    the raw loc bins (y1, x1, y2, x2), masks as COCO uncompressed RLE, skipped pieces and the
    generation's text, tokens and timings; `unmatched`: objects labelled with a name not asked
    for (label, box, loc), `truncated`: true when the answer stopped at the token limit."""
    objects = []
    for obj in result.objects:
        item = {"label": obj.label, "box": [round(float(v), 2) for v in obj.box], "loc": list(obj.loc)}
        if obj.seg is not None:
            item["seg"] = list(obj.seg)
        if obj.mask is not None:
            item["mask"] = mask_to_rle(obj.mask)
        objects.append(item)
    return {
        "task": result.task,
        "prompt": result.prompt,
        "text": result.text,
        "image_size": list(result.image_size),
        "objects": objects,
        "skipped": [{"text": s.text, "reason": s.reason} for s in result.skipped],
        "unmatched": [{"label": o.label, "box": [round(float(v), 2) for v in o.box], "loc": list(o.loc)}
                      for o in result.unmatched],
        "truncated": result.truncated,
        "generation": result.generation.to_dict(),
    }


def draw(result: TaskResult, image: ImageInput, **kwargs):
    """The original image with the result's boxes, labels and masks drawn (a new RGB image)."""
    from .draw import draw_objects

    img = to_rgb(load_image(image))
    if img.size != result.image_size:
        raise PgEdgeError(f"image is {img.size}, the result was made for {result.image_size}")
    return draw_objects(img, result.objects, **kwargs)
