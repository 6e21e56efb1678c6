"""Fixed probe inputs and teacher-forced scoring: how a quantized model's quality is measured.

A probe is an image and a task prompt. The images are fixed, so every run and machine scores the
same pixels: bundled photos (pg_edge/assets), images drawn here deterministically, or the user's
own files (`pg-edge verify --images`). Teacher forcing:
    1. the float model generates a few tokens greedily from the probe (its own answer);
    2. both models score prompt + those tokens in one full forward pass (prefix-LM mask:
       mask_ar 1 on the generated suffix), and the logits of the last prompt position and of
       every generated position are compared (pg_edge.eval.metrics).
Scoring the float model's own continuation keeps both models on the same token sequence, so
one early disagreement does not make every later position incomparable.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image, ImageDraw

from ..model.masks import suffix_mask_ar
from ..inputs.images import load_image

SIZE = 224


def _gradient(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 256, size=(2, 3))
    t = np.linspace(0.0, 1.0, size)[None, :, None]
    row = a[None, None, :] * (1 - t) + b[None, None, :] * t
    return Image.fromarray(np.repeat(row, size, axis=0).astype(np.uint8), "RGB")


def shapes_image(size: int = SIZE) -> Image.Image:
    """Two circles and a rectangle on a colour gradient (something to caption and detect)."""
    img = _gradient(size, 1)
    d = ImageDraw.Draw(img)
    s = size / 224
    d.ellipse([30 * s, 40 * s, 100 * s, 110 * s], fill=(220, 40, 40))
    d.ellipse([130 * s, 120 * s, 200 * s, 190 * s], fill=(40, 60, 220))
    d.rectangle([120 * s, 20 * s, 200 * s, 70 * s], fill=(30, 170, 60))
    return img


def stripes_image(size: int = SIZE) -> Image.Image:
    """Five dark stripes on white (a counting question)."""
    img = Image.new("RGB", (size, size), (250, 250, 245))
    d = ImageDraw.Draw(img)
    w = size / 11
    for i in range(5):
        x = (2 * i + 1) * w
        d.rectangle([x, size * 0.1, x + w, size * 0.9], fill=(20, 20, 40))
    return img


def blocks_image(size: int = SIZE) -> Image.Image:
    """Rows of glyph-like blocks on paper: a text-like layout without any font file."""
    rng = np.random.default_rng(3)
    img = Image.new("RGB", (size, size), (245, 240, 225))
    d = ImageDraw.Draw(img)
    s = size / 224
    for row in range(6):
        x = 16 * s
        y = (24 + 30 * row) * s
        while x < size - 24 * s:
            w = float(rng.integers(5, 14)) * s
            d.rectangle([x, y, x + w, y + 14 * s], fill=(30, 30, 30))
            x += w + float(rng.integers(3, 9)) * s
    return img


def noise_image(size: int = SIZE) -> Image.Image:
    """Seeded colour noise, smoothed: a photo-like texture with no objects."""
    rng = np.random.default_rng(4)
    small = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((size, size), Image.Resampling.BICUBIC)


ASSETS = Path(__file__).parents[1] / "assets"


def photo(name: str):
    """A bundled photo (pg_edge/assets: public domain / CC0, see its README)."""
    return lambda: Image.open(ASSETS / f"{name}.jpg").convert("RGB")


@dataclass(frozen=True)
class Probe:
    """An image (a built-in name before ":" or a file path) and a task prompt."""

    name: str
    prompt: str
    path: str | None = None

    def image(self) -> Image.Image:
        if self.path is not None:
            return load_image(self.path)
        return IMAGES[self.name.split(":")[0]]()


def probes_for(images, prompts) -> list[Probe]:
    """Every user image with every prompt (`pg-edge verify --images ... --prompts ...`)."""
    return [Probe(f"{Path(i).name}:{p}", p, str(i)) for i in images for p in prompts]


IMAGES = {"shapes": shapes_image, "blocks": blocks_image, "stripes": stripes_image, "noise": noise_image,
          "cat": photo("cat"), "astronaut": photo("astronaut"), "coffee": photo("coffee")}
DEFAULT_PROBES = (
    Probe("cat:caption", "caption en"),
    Probe("astronaut:answer", "answer en what is the person wearing?"),
    Probe("coffee:detect", "detect cup"),
    Probe("shapes:caption", "caption en"),
    Probe("blocks:ocr", "ocr"),
    Probe("stripes:answer", "answer en how many stripes are there?"),
    Probe("noise:detect", "detect circle ; square"),
    Probe("shapes:detect", "detect circle"),
    Probe("noise:caption", "describe en"),
)


def default_probes(n: int = 4) -> list[Probe]:
    return list(DEFAULT_PROBES[: max(0, n)])


def resolve_probes(probes) -> list[Probe]:
    """None: the 4 default probes; a number: that many of the built-in ones (at most
    len(DEFAULT_PROBES)); a list: those probes."""
    if probes is None:
        return default_probes()
    if isinstance(probes, int):
        return default_probes(probes)
    return list(probes)


@dataclass
class Scored:
    """One teacher-forced probe: the token sequence both models score, and one model's logits.

    ids: int[T] prompt + generated tokens; mask_ar: int[T] (1 on the generated suffix);
    start: first scored position (the last prompt token); logits: float32[T - start, V_real]."""

    probe: Probe
    ids: np.ndarray
    mask_ar: np.ndarray
    start: int
    generated: list[int]
    logits: np.ndarray


def score(pg, image, ids: np.ndarray, mask_ar: np.ndarray, start: int) -> np.ndarray:
    """Logits of positions start.. of one full forward pass, float32[T - start, V_real].

    pg: a pg_edge.pipeline.PaliGemma. Only the scored positions go through the LM head (the
    other T - start rows of a [T, 257216] matrix would be wasted work and memory)."""
    feats = pg.image_features(pg.prepare([image], [""]).pixel_values)
    out = pg.model(mx.array(ids[None].astype(np.int32)), image_features=feats,
                   mask_ar=mx.array(mask_ar[None].astype(np.int32)), logits_from=start)
    return np.array(out[0, :, : pg.config.real_vocab_size].astype(mx.float32))


def teacher_forced(pg, probes: list[Probe], max_new_tokens: int = 8) -> list[Scored]:
    """Run the (float) model greedily on each probe, then score its continuation."""
    out = []
    for probe in probes:
        image = probe.image()
        prompt = pg.prepare([image], [probe.prompt]).input_ids[0]
        gen = pg.generate(image, probe.prompt, max_tokens=max_new_tokens).tokens
        ids = np.concatenate([prompt, np.asarray(gen, dtype=prompt.dtype)])
        mask_ar = suffix_mask_ar(len(prompt), len(gen))
        start = len(prompt) - 1
        out.append(Scored(probe, ids, mask_ar, start, list(gen), score(pg, image, ids, mask_ar, start)))
    return out


def rescore(pg, reference: list[Scored]) -> list[np.ndarray]:
    """Another model's logits on exactly the reference's token sequences."""
    return [score(pg, s.probe.image(), s.ids, s.mask_ar, s.start) for s in reference]
