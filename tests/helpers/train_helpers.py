"""Small synthetic fine-tuning data for tests/test_train*.py.

The colour task: a square of one of three colours, at a random place and size (half to three
quarters of the side), on a slightly noisy grey background; prefix "colour", suffix the
colour's name. A model that has not learned it
answers garbage (exact match 0); chance for a model that always says one colour is 1/3.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 40), "blue": (40, 40, 220)}


def colour_image(colour: str, rng: np.random.Generator, size: int = 28) -> Image.Image:
    a = rng.integers(118, 139, size=(size, size, 3), dtype=np.uint8)  # grey, a little noise
    side = int(rng.integers(size // 2, size * 3 // 4 + 1))
    y, x = rng.integers(0, size - side + 1, size=2)
    a[y:y + side, x:x + side] = COLOURS[colour]
    return Image.fromarray(a)


def write_colour_set(folder: Path, n: int, seed: int, size: int = 28, prefix: str = "colour") -> Path:
    """n examples (colours in turn) under folder/img, listed in folder/labels.jsonl."""
    folder = Path(folder)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    names = list(COLOURS)
    for i in range(n):
        c = names[i % len(names)]
        colour_image(c, rng, size).save(folder / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "prefix": prefix, "suffix": c})
    return write_jsonl(folder / "labels.jsonl", rows)


def write_jsonl(path: Path, rows: list) -> Path:
    """rows: dicts (written as JSON) or strings (written as they are, for broken lines)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
