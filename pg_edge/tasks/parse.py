"""Reading PaliGemma's task outputs back, no model: cleaning generated text and parsing the
detection / segmentation grammar. (The prompts: pg_edge/tasks/prompts.py.)

Output grammar, per object, objects joined by " ; ":

    <locY1><locX1><locY2><locX2>[<segNNN> x 16] label

Coordinates: bins 0..1023 are divided by 1023, not 1024. big_vision makes the training targets
with `round(v * 1023)` clipped to 0..1023 (big_vision/pp/proj/paligemma/segmentation.py,
`get_refcoco_mask2str`) and its evaluator, which produced the published detection and
segmentation scores, decodes `tok / 1023` (big_vision/evaluators/proj/paligemma/transfers/
segmentation.py). The HF blog and demo Space divide by 1024; that is not the inverse of the
encoding: it pulls every coordinate towards the origin by up to one bin and can never reach the
right/bottom edge (loc1023 -> 0.999). With /1023, `encode_box` and `parse_objects` are inverses
up to half a bin. The two choices differ by at most one bin (< 1 px below 1024 px images).

Boxes come back as floats `(x1, y1, x2, y2)` in pixels of the ORIGINAL image, unrounded
(`x = locX / 1023 * width`), as edge coordinates: 0 is the left edge of the first pixel and
`width` the right edge of the last. Steps that need whole pixels (mask pasting, drawing) take
`int()` of them, as big_vision's evaluator does. Image sizes are `(width, height)`, the order of
PIL's `Image.size`; masks are `bool[height, width]`.

Malformed pieces are never fatal: each is returned in `ParseResult.skipped` with a reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from pg_edge.errors import PgEdgeError

LOC_BINS = 1024  # <loc0000>..<loc1023>
SEG_CODES = 128  # <seg000>..<seg127>
SEG_PER_OBJECT = 16  # a 4x4 grid of VQ-VAE codes
_LOC_SCALE = LOC_BINS - 1  # big_vision's 1023, see the module docstring

_END_MARKERS = ("<eos>", "</s>")  # generation should stop here; anything after is noise
_DROP_RE = re.compile(r"<image>|<bos>|<pad>|<s>")
_ECHO_RE = re.compile(r"^\s*(?:(?:caption|cap|describe|answer|question) [a-z]{2,3}\b"
                      r"|ocr(?=[ \t]*\n)|detect |segment )[^\n]*\n")
_PIECE_RE = re.compile(r"<(loc|seg)(\d+)>|;")


def clean_output(text: str, prompt: str | None = None) -> str:
    """Generated text without eos and what follows it, `<image>`/`<bos>`, and a prompt echo.

    Some runtimes decode the whole sequence, so the text may start with the prefix and "\\n";
    with `prompt` given that exact prefix is dropped, without it a first line that looks like
    a task prompt (`detect ...`, `caption en`, ...) is.
    """
    for marker in _END_MARKERS:
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]
    text = _DROP_RE.sub("", text)
    echo, stripped = (prompt or "").strip(), text.lstrip()
    rest = stripped[len(echo):]
    # The echo must end at a boundary: "detect cat" must not eat the start of "detect cats".
    if echo and stripped.startswith(echo) and (not rest or rest[0].isspace() or rest[0] == "<"):
        text = rest
    else:
        text = _ECHO_RE.sub("", text, count=1)
    return text.strip()


@dataclass(frozen=True)
class DetectedObject:
    """One parsed object.

    label: the text after the tokens ("" when a fine-tuned model emits none).
    box: (x1, y1, x2, y2) float pixels of the original image, see the module docstring.
    loc: the raw bins (y1, x1, y2, x2), 0..1023, in the model's order.
    seg: the 16 mask codes (0..127, row-major 4x4), or None for a detection.
    mask: bool[H, W] full-image mask once `pg_edge.model.vae.add_masks` has decoded `seg`, else None.
    """

    label: str
    box: tuple[float, float, float, float]
    loc: tuple[int, int, int, int]
    seg: tuple[int, ...] | None = None
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Skipped:
    """A piece of output that is not a valid object: its text and why it was refused."""

    text: str
    reason: str


@dataclass
class ParseResult:
    objects: list[DetectedObject]
    skipped: list[Skipped]


def split_asked(objects: Sequence[DetectedObject], names: Sequence[str]
                ) -> tuple[list[DetectedObject], list[DetectedObject]]:
    """(objects whose label is one of `names`, the others), each in output order; labels and
    names compare with surrounding blanks dropped and case folded. `names`: as
    pg_edge.tasks.prompts.object_names gives them."""
    wanted = {n.strip().casefold() for n in names}
    asked = [o for o in objects if o.label.strip().casefold() in wanted]
    return asked, [o for o in objects if o.label.strip().casefold() not in wanted]


def _check_size(image_size: tuple[int, int]) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise PgEdgeError(f"image_size must be (width, height), got {image_size!r}") from None
    if width <= 0 or height <= 0:
        raise PgEdgeError(f"image_size must be positive, got {image_size!r}")
    return width, height


def decode_box(loc: Sequence[int], image_size: tuple[int, int]) -> tuple[float, ...]:
    """Bins (y1, x1, y2, x2) -> (x1, y1, x2, y2) float pixels of an image of (width, height)."""
    width, height = _check_size(image_size)
    y1, x1, y2, x2 = (v / _LOC_SCALE for v in loc)
    return (x1 * width, y1 * height, x2 * width, y2 * height)


def encode_box(box_px: Sequence[float], image_size: tuple[int, int]) -> str:
    """(x1, y1, x2, y2) pixels -> "<locY1><locX1><locY2><locX2>", big_vision's binning.

    Rounds to the nearest bin and clips to 0..1023, so a decode lands within half a bin.
    """
    width, height = _check_size(image_size)
    x1, y1, x2, y2 = (float(v) for v in box_px)
    norm = (y1 / height, x1 / width, y2 / height, x2 / width)
    bins = [min(max(int(round(v * _LOC_SCALE)), 0), _LOC_SCALE) for v in norm]
    return "".join(f"<loc{b:04d}>" for b in bins)


def _atoms(text: str) -> list[tuple[str, int | str | None, int, int]]:
    """(kind, value, start, end) with kind in loc / seg / sep / text (blank text dropped)."""
    atoms, pos = [], 0
    for m in _PIECE_RE.finditer(text):
        if text[pos:m.start()].strip():
            atoms.append(("text", text[pos:m.start()], pos, m.start()))
        if m.group(0) == ";":
            atoms.append(("sep", None, m.start(), m.end()))
        else:
            atoms.append((m.group(1), int(m.group(2)), m.start(), m.end()))
        pos = m.end()
    if text[pos:].strip():
        atoms.append(("text", text[pos:], pos, len(text)))
    return atoms


def _chunks(atoms):
    """Split at ';' and also where a <loc> run starts after other content (missing ' ; ')."""
    chunk = []
    for atom in atoms:
        if atom[0] == "sep" or (atom[0] == "loc" and chunk and chunk[-1][0] != "loc"):
            if chunk:
                yield chunk
            chunk = [] if atom[0] == "sep" else [atom]
        else:
            chunk.append(atom)
    if chunk:
        yield chunk


def _parse_chunk(chunk, width: int, height: int) -> DetectedObject | str:
    """A DetectedObject, or the reason the chunk is not one."""
    kinds = [a[0] for a in chunk]
    n_loc = next((i for i, k in enumerate(kinds) if k != "loc"), len(kinds))
    if n_loc == 0:
        return "stray text without <loc> tokens" if kinds[0] == "text" else "no <loc> tokens"
    n_seg = next((i for i, k in enumerate(kinds[n_loc:]) if k != "seg"), len(kinds) - n_loc)
    tail = chunk[n_loc + n_seg:]
    if any(a[0] != "text" for a in tail):
        return "tokens after the label"
    if n_loc != 4:
        return f"expected 4 <loc> tokens, got {n_loc}"
    loc = tuple(a[1] for a in chunk[:4])
    if any(v >= LOC_BINS for v in loc):
        return f"<loc> value out of range 0..{LOC_BINS - 1}: {loc}"
    seg = tuple(a[1] for a in chunk[4:4 + n_seg]) or None
    if n_seg and n_seg != SEG_PER_OBJECT:
        return f"truncated or overlong mask: {n_seg} of {SEG_PER_OBJECT} <seg> tokens"
    if seg and any(v >= SEG_CODES for v in seg):
        return f"<seg> value out of range 0..{SEG_CODES - 1}"
    y1, x1, y2, x2 = loc
    if y2 <= y1 or x2 <= x1:
        return f"empty box: need y2 > y1 and x2 > x1, got (y1, x1, y2, x2) = {loc}"
    label = " ".join(" ".join(a[1] for a in tail).split())
    return DetectedObject(label, decode_box(loc, (width, height)), loc, seg)


def parse_objects(text: str, image_size: tuple[int, int], prompt: str | None = None
                  ) -> ParseResult:
    """Parse a detect/segment output into objects with boxes in original-image pixels.

    text: the generated text (special tokens kept, e.g. decoded with skip_special_tokens off).
    image_size: (width, height) of the ORIGINAL image, not of the model input.
    prompt: the prefix, to drop its echo if the runtime returned the whole sequence.
    Never raises on model output: bad pieces go to `skipped` with a reason.
    """
    width, height = _check_size(image_size)
    cleaned = clean_output(text, prompt)
    objects, skipped = [], []
    for chunk in _chunks(_atoms(cleaned)):
        result = _parse_chunk(chunk, width, height)
        if isinstance(result, str):
            skipped.append(Skipped(cleaned[chunk[0][2]:chunk[-1][3]].strip(), result))
        else:
            objects.append(result)
    return ParseResult(objects, skipped)
