"""`make demo`: the whole path on a tiny model, offline, on a fresh machine.

For now the model is a tiny PaliGemma 2 with RANDOM weights in the official Hugging Face
layout (built with transformers' own classes, and a tokenizer with the real vocabulary layout):
convert -> load -> generate, streamed. Random weights give meaningless text; what the demo shows
is that every stage runs. A later release ships a small model trained by pg_edge's own
fine-tuning pipeline in its place.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

OUT = Path("demo_out")


def build_checkpoint(work: Path) -> Path:
    # The test fixtures' builders make the official layout; reused so the demo needs no download.
    from tests.fixtures.checkpoints import FixtureSpec, make_hf_checkpoint
    from tests.fixtures.tokenizer import build_tokenizer

    tok = build_tokenizer(work / "tokenizer")
    return make_hf_checkpoint(work / "hf", FixtureSpec(version=2, image_size=56), tok)


def demo_image():
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 240), (40, 110, 200))
    d = ImageDraw.Draw(img)
    d.ellipse((60, 50, 170, 160), fill=(240, 200, 40))
    d.rectangle((190, 110, 290, 210), fill=(200, 40, 60))
    return img


def main() -> int:
    import pg_edge
    from convert.hf import convert_hf

    print("pg_edge demo: tiny PaliGemma 2 with RANDOM weights -> the text below is meaningless;")
    print("it shows the pipeline (HF checkpoint -> convert -> load -> stream) working end to end.\n")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_checkpoint(Path(tmp))
        print(f"built a random HF-layout checkpoint in {time.perf_counter() - t0:.1f} s")
        folder = convert_hf(hf, OUT / "model", force=True, quiet=True)
    print(f"converted to {folder}")
    pg = pg_edge.load(folder)
    image = demo_image()
    image.save(OUT / "demo.png")
    for prompt in ("caption en", "detect circle ; square"):
        print(f"\n> {prompt}\n", end="")
        result = None
        for chunk in pg.stream(image, prompt, max_tokens=24):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            result = chunk.result or result
        print(f"\n[{result.prompt_tokens} prompt tokens, {len(result.tokens)} generated, "
              f"{result.generation_tps:.1f} tok/s, SigLIP runs so far: {pg.vision_calls}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
