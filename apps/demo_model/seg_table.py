"""The segment codes the trained model already uses, per (kind, box side): training targets for
re-transfer when the VQ-VAE encoder that made the original targets is gone.

    python -m apps.demo_model.seg_table --model HF --vae apps/demo_model/vae-oid.npz -o TABLE.json

A shape's 64x64 box crop depends only on its kind and its side (40..100 px; boxes are square and
at whole pixels), so 3 x 61 code sequences cover every object. For each (kind, side) the model
(an HF folder) is shown one shape of that kind and side at a few places and colours, prompted
"segment KIND", given the true box tokens, and decodes 16 `<seg>` codes greedily (teacher
forcing the box); of those candidates the one whose decoded mask (the kept decoder) best
matches the crop is kept. Prints the mean and worst 64x64 IoU. Dev tool (torch).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from apps.demo_model import arch
from apps.demo_model.vqvae import VQVAE, crop_masks
from pg_edge.demo import shapes as S
from pg_edge.inputs.images import preprocess_image
from pg_edge.tasks.parse import encode_box
from pg_edge.inputs.tokenizer import Tokenizer

PLACES = ((8, 8, "red"), (60, 40, "blue"), (30, 90, "green"), (100, 100, "yellow"))


def candidates(kind: str, side: int) -> list[S.Sample]:
    """One image per PLACES entry: the task's background and noise, one shape of `kind`."""
    out = []
    for i, (x, y, colour) in enumerate(PLACES):
        x, y = min(x, S.SIZE - S.MARGIN - side), min(y, S.SIZE - S.MARGIN - side)
        rng = np.random.default_rng((side, i))
        pixels = rng.integers(190, 251, size=3)[None, None] + rng.integers(-10, 11, size=(S.SIZE, S.SIZE, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        shape = S.Shape(kind, colour, (x, y, x + side, y + side))
        S.draw_shape(ImageDraw.Draw(image), kind, shape.box, S.COLOURS[colour])
        out.append(S.Sample(image, [shape]))
    return out


def decoder(path: Path) -> VQVAE:
    model = VQVAE()
    with np.load(path) as data:
        model.load_state_dict({k: torch.from_numpy(data[k]) for k in data.files}, strict=False)
    return model.eval()


@torch.no_grad()
def model_codes(model, tok: Tokenizer, samples: list[S.Sample]) -> np.ndarray:
    """int[N, 16]: the codes the model writes after each sample's true box."""
    n_image = (arch.IMAGE_SIZE // arch.VISION["patch_size"]) ** 2
    rows, types = [], []
    for s in samples:
        pre = tok.prompt_ids(S.segment_prompt([s.shapes[0].kind]), n_image)
        box = tok.encode(encode_box(s.shapes[0].box, (S.SIZE, S.SIZE)))
        rows.append(pre + box)
        types.append([0] * len(pre) + [1] * len(box))
    ids, tt = torch.tensor(rows), torch.tensor(types)
    pixels = torch.from_numpy(np.stack([preprocess_image(s.image, arch.IMAGE_SIZE) for s in samples])
                              .transpose(0, 3, 1, 2))
    allowed = torch.full((model.config.text_config.vocab_size,), float("-inf"))
    allowed[tok.seg0:tok.seg0 + 128] = 0
    for _ in range(16):
        logits = model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                       token_type_ids=tt).logits[:, -1]
        nxt = (logits + allowed[:logits.shape[-1]]).argmax(-1, keepdim=True)
        ids, tt = torch.cat([ids, nxt], 1), torch.cat([tt, torch.ones_like(nxt)], 1)
    return (ids[:, -16:] - tok.seg0).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF folder of the trained model")
    p.add_argument("--vae", required=True, help="vae-oid.npz (the decoder the codes are read with)")
    p.add_argument("-o", "--output", required=True)
    a = p.parse_args()
    from transformers import PaliGemmaForConditionalGeneration

    torch.set_num_threads(1)
    model = PaliGemmaForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32).eval()
    tok, vae = Tokenizer(a.model), decoder(Path(a.vae))
    table, ious = {}, []
    for kind in S.KINDS:
        for side in range(S.SIDE[0], S.SIDE[1] + 1):
            samples = candidates(kind, side)
            codes = model_codes(model, tok, samples)
            crop = torch.from_numpy(crop_masks(samples[:1]))[0] > 0
            rec = vae.decode(torch.from_numpy(codes)) > 0
            iou = ((rec & crop).sum((1, 2)) / (rec | crop).sum((1, 2))).numpy()
            best = int(iou.argmax())
            table[f"{kind}/{side}"] = [int(c) for c in codes[best]]
            ious.append(float(iou[best]))
    Path(a.output).write_text(json.dumps(table) + "\n")
    print(f"wrote {a.output}: {len(table)} code sequences, 64x64 IoU mean {np.mean(ious):.4f} "
          f"worst {np.min(ious):.4f}")


if __name__ == "__main__":
    main()
