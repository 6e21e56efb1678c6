"""JSONL files for the task-transfer stage (`pg-edge finetune`): counting plus a replay of the
pretraining tasks, so the model learns to count without forgetting the rest.

    python -m apps.demo_model.finetune_data --vae VAE.npz -o DIR [--train N] [--valid N] [--mix SHARES]

Writes DIR/images/*.png, DIR/train.jsonl and DIR/valid.jsonl ({"image", "prefix", "suffix"},
image paths relative to the file). Train images come from the train split past the ones the
pretraining run drew, validation from the valid split. By default 60% of the examples are
counting, the rest caption / detect / segment (MIX; --mix "count=0.3,caption=0.3,..." changes
the shares). Dev tool (torch for the VQ-VAE encoder).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from apps.demo_model.examples import example
from apps.demo_model.vqvae import crop_masks, load_npz
from pg_edge.demo import shapes as S

# Counting is what this stage teaches; the replay is short (segment rows are the longest and
# cost most per step in MLX on a CPU, so they replay least).
MIX = (("count", 0.6), ("caption", 0.15), ("detect", 0.15), ("segment", 0.1))
FIRST_TRAIN_IMAGE = 10_000_000  # beyond anything the pretraining draws


def write(out: Path, name: str, samples, vae, rng, mix=MIX) -> Path:
    (out / "images").mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        codes = vae.encode(torch.from_numpy(crop_masks(samples))).numpy()
    it = iter(codes)
    names, probs = zip(*mix)
    lines = []
    for i, s in enumerate(samples):
        lookup = {sh: [int(c) for c in next(it)] for sh in s.shapes}
        path = out / "images" / f"{name}_{i:05d}.png"
        s.image.save(path)
        task = names[rng.choice(len(names), p=probs)]
        # No empty answers, as the shipped run had them (pg-edge finetune then refused them).
        prefix, suffix = example(s, task, rng, seg_codes=lambda sh: lookup[sh], allow_empty=False)
        lines.append(json.dumps({"image": f"images/{path.name}", "prefix": prefix, "suffix": suffix}))
    f = out / f"{name}.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--train", type=int, default=600)
    p.add_argument("--valid", type=int, default=48)
    p.add_argument("--mix", default=None, help='task shares, e.g. "count=0.3,caption=0.3,detect=0.2,segment=0.2"')
    a = p.parse_args()
    mix = MIX
    if a.mix:
        mix = tuple((k, float(v)) for k, v in (kv.split("=") for kv in a.mix.split(",")))
        total = sum(v for _, v in mix)
        mix = tuple((k, v / total) for k, v in mix)
    out, vae, rng = Path(a.output), load_npz(Path(a.vae)), np.random.default_rng(7)
    write(out, "train", S.split("train", a.train, FIRST_TRAIN_IMAGE), vae, rng, mix)
    write(out, "valid", S.split("valid", a.valid), vae, rng, mix)
    print(f"wrote {out}/train.jsonl ({a.train}) and valid.jsonl ({a.valid})")


if __name__ == "__main__":
    main()
