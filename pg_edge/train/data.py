"""Fine-tuning data: (image, prefix, suffix) examples, checked up front, batched for the loss.

Sources:
    JSONL file    one object per line: {"image": "imgs/1.jpg", "prefix": "caption en",
                  "suffix": "a cat on a sofa"}; image paths are relative to the JSONL file
                  (absolute paths are kept). Blank lines are skipped.
    folder        a folder holding `labels.jsonl` in that same form, images beside it or below.
    COCO file     a *.json COCO detection file (what `pg-edge label` writes, or any): boxes become
                  `<loc>` answers, masks `<seg>` answers, see pg_edge/train/coco.py.

Every line is checked before any training starts (the file is JSON, the keys are there and are
strings, the image exists and is an image within the pixel limit, from its header); all bad
lines are reported at once, each by file and line number, as one `DataError`. With the model's
context length (`context`, as `pg-edge finetune` and the Trainer pass it), every example must fit
it too.

One example becomes one row (big_vision's layout, and the one inference uses):

    tokens    <image> x N   <bos> prefix "\\n"   suffix <eos>   <pad> ...
    mask_ar   0 ...         0 ...              1 ...          0 ...     (0: bidirectional prefix)
    loss      0 ...         0 ...              1 ...          0 ...     (suffix + eos only)
    valid     1 ...         1 ...              1 ...          0 ...     (right padding)

An empty suffix (or one of blanks) is a valid answer: "nothing here", as detection data says of an
object that is not in the image. Its row trains the `<eos>` alone, predicted from the `"\n"`.

Rows are right-padded, so every row's positions start at 0 at index 0.

Batch order is a pure function of (seed, step): epoch e visits the examples in the permutation
`default_rng([seed, e])`, and step s takes the next `batch_size` of that endless stream. Resuming
at step s therefore sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from ..errors import ImageError, PgEdgeError
from ..inputs.images import check_header
from ..model.masks import suffix_mask_ar
from ..inputs.images import preprocess_image
from ..inputs.tokenizer import Tokenizer

REQUIRED_KEYS = ("image", "prefix", "suffix")
FOLDER_LABELS = "labels.jsonl"
MAX_REPORTED = 8  # bad lines listed in one error; the rest are counted
CACHE_BYTES = 2 << 30  # keep preprocessed images in memory when they all fit in this


class DataError(PgEdgeError):
    """A training or validation file that cannot be used, naming the file and line."""


@dataclass(frozen=True)
class Example:
    image: Path
    prefix: str
    suffix: str
    where: str  # "train.jsonl:12", for messages


@dataclass
class Batch:
    """Model inputs and targets of B rows, right-padded to T.

    input_ids int32[B, T]; mask_ar int32[B, T] (1 on suffix tokens); valid bool[B, T];
    loss_mask bool[B, T] (True on the suffix + eos tokens to predict); pixel_values
    float32[B, S, S, 3] in [-1, 1]; index int[B]: the examples' positions in their dataset.
    """

    input_ids: np.ndarray
    mask_ar: np.ndarray
    valid: np.ndarray
    loss_mask: np.ndarray
    pixel_values: np.ndarray
    index: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.valid.sum())


def _check_line(raw: str, base: Path, where: str) -> Example | str:
    """The example of one JSONL line, or why the line is bad."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg} at column {err.colno})"
    except RecursionError:
        return "JSON nested too deeply (expected one flat object)"
    if not isinstance(obj, dict):
        return f"expected a JSON object with keys {', '.join(REQUIRED_KEYS)}, got {type(obj).__name__}"
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        return f"missing key(s) {', '.join(repr(k) for k in missing)}"
    wrong = [k for k in REQUIRED_KEYS if not isinstance(obj[k], str)]
    if wrong:
        return f"{', '.join(repr(k) for k in wrong)} must be a string"
    if not obj["image"].strip():
        return "empty image path"
    path = Path(obj["image"]).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        return f"image not found: {path}"
    try:
        check_header(path, str(path))  # the header only: cheap; non-images, FIFOs, pixel limit
    except ImageError as err:
        return str(err)
    return Example(path, obj["prefix"], obj["suffix"], where)


def read_examples(source: str | Path, coco=None, note=lambda _: None) -> list[Example]:
    """All examples of a JSONL file, a folder with labels.jsonl or a COCO *.json file (read with
    `coco`, a pg_edge.train.coco.CocoOptions, default ones if None; `note` gets its remarks);
    DataError on any bad line."""
    src = Path(source).expanduser()
    from .coco import CocoOptions, is_coco, read_coco

    if is_coco(src) and not src.is_dir():
        return read_coco(src, coco or CocoOptions(), note)
    if src.is_dir():
        jsonl = src / FOLDER_LABELS
        if not jsonl.is_file():
            raise DataError(f"{src} is a folder without {FOLDER_LABELS} (one JSON object per line: "
                            '{"image": ..., "prefix": ..., "suffix": ...}, image paths relative to it)')
        src = jsonl
    if not src.is_file():
        raise DataError(f"data file not found: {src}")
    try:
        lines = src.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{src} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    examples, bad = [], []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{src.name}:{n}"
        got = _check_line(raw, src.parent, where)
        if isinstance(got, str):
            bad.append(f"{src}:{n}: {got}")
        else:
            examples.append(got)
    if bad:
        more = f" (and {len(bad) - MAX_REPORTED} more bad lines)" if len(bad) > MAX_REPORTED else ""
        head = f"{len(bad)} bad line(s) in {src}: " if len(bad) > 1 else ""
        raise DataError(head + "; ".join(bad[:MAX_REPORTED]) + more)
    if not examples:
        raise DataError(f"{src} has no examples")
    return examples


class Dataset:
    """Tokenized examples with their images (preprocessed lazily; kept in memory once seen when
    the whole set fits in CACHE_BYTES, else decoded again each epoch)."""

    def __init__(self, examples: Sequence[Example], tokenizer: Tokenizer, image_size: int,
                 num_image_tokens: int, max_len: int | None = None, cache_images: bool | None = None,
                 context: int | None = None):
        self.examples = list(examples)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.prompts: list[list[int]] = []
        self.suffixes: list[list[int]] = []
        for ex in self.examples:
            prompt = tokenizer.prompt_ids(ex.prefix, num_image_tokens)
            suffix = tokenizer.suffix_ids(ex.suffix if ex.suffix.strip() else "")  # "": <eos> alone
            if max_len is not None:
                if len(prompt) >= max_len:
                    raise DataError(f"{ex.where}: the prompt alone is {len(prompt)} tokens "
                                    f"(image {num_image_tokens} + text), max_len is {max_len}")
                # big_vision truncates the suffix (eos included) to the text length.
                suffix = suffix[:max_len - len(prompt)]
            self.prompts.append(prompt)
            self.suffixes.append(suffix)
        if context is not None:
            self.check_context(context)
        if cache_images is None:
            cache_images = len(self.examples) * image_size * image_size * 3 * 4 <= CACHE_BYTES
        self._pixels: dict[int, np.ndarray] | None = {} if cache_images else None

    def __len__(self) -> int:
        return len(self.examples)

    def check_context(self, context: int) -> None:
        """DataError naming every example whose row (image tokens, prompt, suffix, eos) is longer
        than the model's `context` tokens: refused before any compute, not in the gradient step."""
        long = [(ex.where, len(p) + len(s)) for ex, p, s in zip(self.examples, self.prompts, self.suffixes)
                if len(p) + len(s) > context]
        if long:
            listed = "; ".join(f"{w}: {n:,} tokens" for w, n in long[:MAX_REPORTED])
            more = f" (and {len(long) - MAX_REPORTED} more)" if len(long) > MAX_REPORTED else ""
            raise DataError(f"{len(long)} example(s) longer than the model's context of {context:,} tokens "
                            f"(image tokens, prompt, suffix and eos): {listed}{more}; shorten them or "
                            f"pass --max-len (at most {context:,})")

    def loss_tokens(self, index: Sequence[int]) -> np.ndarray:
        """int[len(index)]: suffix tokens (eos included) each example is trained on."""
        return np.array([len(self.suffixes[i]) for i in index], dtype=np.int64)

    def pixels(self, i: int) -> np.ndarray:
        """float32[S, S, 3] of example i."""
        if self._pixels is not None and i in self._pixels:
            return self._pixels[i]
        px = preprocess_image(self.examples[i].image, self.image_size)
        if self._pixels is not None:
            self._pixels[i] = px
        return px

    def batch(self, index: Sequence[int]) -> Batch:
        """The rows of these examples, right-padded to the longest."""
        index = np.asarray(index, dtype=np.int64)
        rows = [(self.prompts[i], self.suffixes[i]) for i in index]
        T = max(len(p) + len(s) for p, s in rows)
        B = len(rows)
        ids = np.full((B, T), self.tokenizer.pad_id, dtype=np.int32)
        mask_ar = np.zeros((B, T), dtype=np.int32)
        valid = np.zeros((B, T), dtype=bool)
        loss = np.zeros((B, T), dtype=bool)
        for b, (p, s) in enumerate(rows):
            n = len(p) + len(s)
            ids[b, :n] = p + s
            mask_ar[b] = suffix_mask_ar(len(p), len(s), T)
            loss[b, len(p):n] = True
            valid[b, :n] = True
        pixels = np.stack([self.pixels(int(i)) for i in index])
        return Batch(ids, mask_ar, valid, loss, pixels, index)

    def fingerprint(self) -> str:
        """Hash of the examples (paths and texts): a resumed run must train on the same data."""
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(f"{ex.image}\0{ex.prefix}\0{ex.suffix}\n".encode())
        return h.hexdigest()[:16]


def load_dataset(source: str | Path, tokenizer: Tokenizer, image_size: int, num_image_tokens: int,
                 max_len: int | None = None, context: int | None = None, coco=None,
                 note=lambda _: None) -> Dataset:
    """read_examples + tokenization: everything that can fail on bad data, before training
    (with `context`, the model's context length, also every example's length; `coco` and `note`:
    see read_examples)."""
    return Dataset(read_examples(source, coco, note), tokenizer, image_size, num_image_tokens, max_len,
                   context=context)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """int[batch_size]: the examples of optimizer step `step` (0-based), a pure function."""
    start = step * batch_size
    out = np.empty(batch_size, dtype=np.int64)
    perms: dict[int, np.ndarray] = {}
    for j in range(batch_size):
        epoch, k = divmod(start + j, n)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out[j] = perms[epoch][k]
    return out


def split(index: np.ndarray, parts: int, part: int) -> np.ndarray:
    """The `part`-th of `parts` equal contiguous pieces of `index` (micro-batches, ranks)."""
    if len(index) % parts:
        raise PgEdgeError(f"batch of {len(index)} does not split into {parts} equal parts")
    size = len(index) // parts
    return index[part * size:(part + 1) * size]
