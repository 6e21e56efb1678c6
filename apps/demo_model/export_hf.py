"""A float converted folder (e.g. `pg-edge finetune --export fused` output) -> the official
Hugging Face layout, written by transformers' own `save_pretrained`.

    python -m apps.demo_model.export_hf CONVERTED --like HF_PRETRAINED -o HF_OUT

The architecture and config come from HF_PRETRAINED (the pretraining output); every tensor is
replaced by the converted folder's (classic key names, patch conv OHWI -> OIHW), so
`pg-edge convert HF_OUT --dtype float32` gives back exactly the converted tensors (checked here
before writing). Tokenizer and preprocessor files are copied along. Dev tool (torch).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from pg_edge.checkpoint.weights import canonical_key

SIDE = ("tokenizer.model", "added_tokens.json", "special_tokens_map.json", "preprocessor_config.json")


def converted_tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name != "vae.safetensors":
            out.update(load_file(f))
    return out


def export(converted: Path, like: Path, out: Path) -> Path:
    from transformers import PaliGemmaForConditionalGeneration

    model = PaliGemmaForConditionalGeneration.from_pretrained(like, dtype=torch.float32)
    src = converted_tensors(converted)
    state, used = {}, set()
    for key, value in model.state_dict().items():
        k = canonical_key(key)
        if k == "language_model.lm_head.weight" and k not in src:
            k = "language_model.model.embed_tokens.weight"  # tied
        a = src[k]
        if k.endswith("patch_embedding.weight"):
            a = a.transpose(0, 3, 1, 2)  # OHWI -> OIHW
        assert tuple(a.shape) == tuple(value.shape), (key, a.shape, value.shape)
        state[key] = torch.from_numpy(np.ascontiguousarray(a).astype(np.float32))
        used.add(k)
    missing = set(src) - used
    assert not missing, f"tensors not exported: {sorted(missing)[:3]}"
    model.load_state_dict(state, strict=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    model.save_pretrained(tmp)
    for name in SIDE:
        shutil.copy(like / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("converted")
    p.add_argument("--like", required=True)
    p.add_argument("-o", "--output", required=True)
    a = p.parse_args()
    out = export(Path(a.converted), Path(a.like), Path(a.output))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
