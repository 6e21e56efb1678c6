"""The demo model's architecture: a tiny PaliGemma 2 (SigLIP + Gemma2), as a transformers config.

Widths are multiples of 64 so every matrix quantizes group-wise (group 64). 224 px input with
32 px patches gives 7x7 = 49 image tokens: the task's images are 224 px, so no resize, and the
short prefix keeps batched CPU evaluation cheap (apps/demo_model/README.md has the measurements).
"""
from __future__ import annotations

IMAGE_SIZE = 224
VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
              patch_size=32)
TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32)


def hf_config(sp_size: int, bos: int, eos: int, pad: int, vision=None, text=None, image_size=IMAGE_SIZE):
    """transformers.PaliGemmaConfig; vocab = sp pieces + `<image>` (= id sp_size), padded to 64."""
    from transformers import PaliGemmaConfig

    vocab = -(-(sp_size + 1) // 64) * 64
    v = dict(model_type="siglip_vision_model", image_size=image_size, vision_use_head=False,
             layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", **(vision or VISION))
    t = dict(model_type="gemma2", vocab_size=vocab, hidden_activation="gelu_pytorch_tanh",
             rms_norm_eps=1e-6, max_position_embeddings=512, sliding_window=512,
             attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
             bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, **(text or TEXT))
    cfg = PaliGemmaConfig(vision_config=v, text_config=t, image_token_index=sp_size,
                          projection_dim=t["hidden_size"], hidden_size=t["hidden_size"],
                          vocab_size=vocab, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    cfg.text_config._attn_implementation = "eager"
    return cfg
