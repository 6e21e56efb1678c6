"""A tiny HF PaliGemma checkpoint whose widths MLX can quantize, for tests/test_quantize.py.

The shared fixtures (tests/fixtures/checkpoints.py) use widths 40 (SigLIP) and 48 (Gemma): not
multiples of 32, so nothing but o_proj could be quantized in them. This builds the same kind
of model (same random fill, same tokenizer, classic hub layout) with widths 64, keeping the
property that matters for SigLIP: its MLP width 72 is a multiple of no group size, like 4304.

    vision: hidden 64 = 4 heads x 16, MLP 72 (-> 96 padded for group 32, 128 for 64/128), 2 layers
    decoder: D 64, 4 q heads x 16, MLP 128; PG1 1 kv head, 2 layers; PG2 2 kv heads, 3 layers
With group 128 the 64-wide inputs cannot be quantized: those layers are left float, and said so.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from fixtures import checkpoints as ck
from fixtures.tokenizer import BOS_ID, EOS_ID, IMAGE_TOKEN_ID, PAD_ID, set_image_geometry

D = 64
VISION = dict(hidden_size=64, num_attention_heads=4, intermediate_size=72, num_hidden_layers=2, patch_size=7)
TEXT = {
    1: dict(hidden_size=D, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
            num_hidden_layers=2),
    2: dict(hidden_size=D, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_hidden_layers=3, query_pre_attn_scalar=20, attn_logit_softcapping=2.0,
            final_logit_softcapping=15.0),
}


def build_config(version: int, image_size: int = 28):
    from transformers import PaliGemmaConfig

    vision = dict(model_type="siglip_vision_model", image_size=image_size, vision_use_head=False,
                  layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", **VISION)
    text = dict(model_type="gemma" if version == 1 else "gemma2", vocab_size=ck.HF_VOCAB,
                hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, max_position_embeddings=8192,
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, **TEXT[version])
    if version == 2:
        text["sliding_window"] = ck.DEFAULT_SLIDING_WINDOW
    cfg = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                          projection_dim=D, hidden_size=D, vocab_size=ck.HF_VOCAB, bos_token_id=BOS_ID,
                          eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    cfg._attn_implementation = "eager"
    return cfg


def make_quantizable_checkpoint(out_dir: Path, tokenizer_dir: Path, version: int = 1, seed: int = 0,
                                image_size: int = 28) -> Path:
    """Write the classic-layout HF folder (weights + config + tokenizer files) into out_dir."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(build_config(version, image_size)).to(torch.float32).eval()
    ck._randomize_(model, seed)  # the shared fixtures' fill: every tensor random, logits O(10)
    ck._write_shards(ck._layout_state_dict(model, "classic"), out_dir, max_shard_bytes=2_000_000)
    model.generation_config.save_pretrained(str(out_dir))
    model.config.architectures = ["PaliGemmaForConditionalGeneration"]
    cfg = ck._legacy_config(json.loads(model.config.to_json_string(use_diff=True)), "4.42.0.dev0")
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in sorted(Path(tokenizer_dir).iterdir()):
        if f.is_file():
            shutil.copyfile(f, out_dir / f.name)
    n = (image_size // VISION["patch_size"]) ** 2
    set_image_geometry(out_dir, image_size, n)
    return out_dir
