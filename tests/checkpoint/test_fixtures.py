"""The fixtures themselves: if these fail, every parity test built on them is meaningless.

Checks: tokenizer ids (sentencepiece and transformers agree with the real PaliGemma layout),
every checkpoint layout loads in transformers with identical logits, sliding window and softcaps
are live, the top-level hidden_size mismatch is really there, weights are really random.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fixtures.checkpoints import HF_VOCAB, TEXT_D, VISION, load_hf_model
from fixtures.tokenizer import (BOS_ID, EOS_ID, IMAGE_TOKEN_ID, LOC_BASE, NEWLINE_ID, PAD_ID, SEG_BASE,
                                      SP_VOCAB, UNK_ID, load_sp)

TEXTS = ["caption en", "detect cat ; dog", "answer en what is in the image?", "Hello 12345 wörld 😀",
         "  two  spaces\tand a tab", "segment <loc0012><loc1023><seg042> cat", "a\nb"]


def _keys(folder) -> dict:
    """{tensor name: shape} over all safetensors files of `folder`."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as g:
            out.update({k: tuple(g.get_slice(k).get_shape()) for k in g.keys()})
    return out


def _tensors(folder) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as g:
            out.update({k: g.get_tensor(k) for k in g.keys()})
    return out


def _inputs(num_image_tokens: int, image_size: int, text_len: int = 14, seed: int = 0):
    """Prompt [<image> x N, <bos>, prefix..., "\\n", suffix...] with a bidirectional prefix."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(400, 800, (text_len,), generator=g)
    n_prefix = text_len // 2
    ids = torch.cat([torch.full((num_image_tokens,), IMAGE_TOKEN_ID), torch.tensor([BOS_ID]), text[:n_prefix],
                     torch.tensor([NEWLINE_ID]), text[n_prefix:]])[None]
    tt = torch.zeros_like(ids)
    tt[0, num_image_tokens + 2 + n_prefix:] = 1  # suffix tokens are causal
    pixels = torch.rand((1, 3, image_size, image_size), generator=g) * 2 - 1
    return dict(input_ids=ids, token_type_ids=tt, pixel_values=pixels)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[0]


# ---------------------------------------------------------------- tokenizer


def test_sentencepiece_layout(tokenizer_dir):
    sp = load_sp(tokenizer_dir)
    assert sp.get_piece_size() == SP_VOCAB == 257152
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (PAD_ID, EOS_ID, BOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert sp.id_to_piece(NEWLINE_ID) == "\n" and sp.encode("\n") == [108]
    assert sp.id_to_piece(LOC_BASE) == "<loc0000>" and sp.id_to_piece(SEG_BASE - 1) == "<loc1023>"
    assert sp.id_to_piece(SEG_BASE) == "<seg000>" and sp.id_to_piece(SP_VOCAB - 1) == "<seg127>"
    assert sp.encode("<loc0123>") == [256123]
    assert sp.encode("<seg042>") == [SEG_BASE + 42]
    assert sp.piece_to_id("<image>") == UNK_ID  # <image> is an HF added token, not in the sp model
    for text in TEXTS:
        ids = sp.encode(text)
        assert sp.decode(ids) == text  # byte fallback + identity normalizer: lossless
        # filler pieces (UNUSED type) must never come out of the encoder
        assert all(not sp.id_to_piece(i).startswith("<filler") for i in ids), text
    assert sp.encode("12") == [sp.piece_to_id("1"), sp.piece_to_id("2")]  # digits split
    assert sp.encode(" a")[0] == sp.piece_to_id("▁a") or sp.id_to_piece(sp.encode(" a")[0]).startswith("▁")


def test_transformers_tokenizer_matches_sentencepiece(tokenizer_dir):
    from transformers import PaliGemmaProcessor

    proc = PaliGemmaProcessor.from_pretrained(str(tokenizer_dir))
    tok = proc.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)
    assert tok.convert_tokens_to_ids("<image>") == proc.image_token_id == IMAGE_TOKEN_ID == 257152
    assert tok("<loc0123>", add_special_tokens=False).input_ids == [256123]
    assert tok("<seg127>", add_special_tokens=False).input_ids == [257151]
    sp = load_sp(tokenizer_dir)
    for text in TEXTS:
        assert tok(text, add_special_tokens=False).input_ids == sp.encode(text), text
    files = {p.name for p in tokenizer_dir.iterdir()}
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "added_tokens.json", "preprocessor_config.json", "processor_config.json"} <= files
    assert json.loads((tokenizer_dir / "added_tokens.json").read_text()) == {"<image>": 257152}
    assert "vocab_file" not in json.loads((tokenizer_dir / "tokenizer_config.json").read_text())


def test_processor_prompt_from_checkpoint(hf_checkpoint, sample_images):
    from transformers import PaliGemmaProcessor

    folder = hf_checkpoint(version=1, image_size=28)
    proc = PaliGemmaProcessor.from_pretrained(str(folder))
    out = proc(images=sample_images[1], text="<image>detect cat", suffix="<loc0001> cat", return_tensors="pt")
    sp = load_sp(folder)
    want = [IMAGE_TOKEN_ID] * 16 + [BOS_ID] + sp.encode("detect cat") + [NEWLINE_ID] + sp.encode("<loc0001> cat")
    assert out["input_ids"][0].tolist() == want + [EOS_ID]
    assert tuple(out["pixel_values"].shape) == (1, 3, 28, 28)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["image_seq_length"] == 16 and pre["size"] == {"height": 28, "width": 28}


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("version", [1, 2])
def test_layouts_load_with_identical_logits(hf_checkpoint, version):
    folders = {lay: hf_checkpoint(version=version, layout=lay) for lay in ("flat", "classic", "v452")}
    keys = {lay: _keys(f) for lay, f in folders.items()}
    # flat is what transformers 5 save_pretrained writes; the others are renames of it
    assert "vision_tower.embeddings.patch_embedding.weight" in keys["flat"]
    assert "language_model.model.embed_tokens.weight" in keys["flat"]
    assert not any(k.startswith(("model.", "lm_head")) or "vision_model" in k for k in keys["flat"])
    classic = {k.replace("vision_tower.vision_model.", "vision_tower."): s for k, s in keys["classic"].items()}
    assert classic == keys["flat"]
    assert "lm_head.weight" in keys["v452"] and "model.vision_tower.vision_model.post_layernorm.bias" in keys["v452"]
    assert len(keys["v452"]) == len(keys["flat"]) + 1
    # sharding: both sharded layouts have an index and >= 2 shards; v452 is a single file
    for lay in ("flat", "classic"):
        index = json.loads((folders[lay] / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 2 and set(index["weight_map"]) == set(keys[lay])
    assert (folders["v452"] / "model.safetensors").exists()

    shapes = keys["classic"]
    assert shapes["language_model.model.embed_tokens.weight"] == (HF_VOCAB, TEXT_D)
    assert shapes["vision_tower.vision_model.embeddings.patch_embedding.weight"] == (40, 3, 7, 7)
    assert shapes["language_model.model.layers.0.self_attn.q_proj.weight"] == (64, TEXT_D)
    assert shapes["language_model.model.layers.0.self_attn.k_proj.weight"] == ((1 if version == 1 else 2) * 16, TEXT_D)
    assert shapes["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"] == (VISION["intermediate_size"], 40)

    inputs = _inputs(16, 28)
    logits = {lay: _logits(load_hf_model(f), inputs) for lay, f in folders.items()}
    assert torch.equal(logits["flat"], logits["classic"]) and torch.equal(logits["flat"], logits["v452"])
    real = logits["flat"][:, :SP_VOCAB]
    assert torch.isfinite(real).all() and 3 < real.abs().max() < 60
    assert logits["flat"][:, SP_VOCAB:].abs().max() < 0.5  # padded junk rows never win
    # the decoder layers, not the residual token embedding alone, decide the next token
    last = inputs["input_ids"][0, 17:]
    assert (real[17:].argmax(-1) != last).any()


def test_weights_are_random_everywhere(hf_checkpoint):
    t = _tensors(hf_checkpoint(version=2, layout="classic"))
    norms = [k for k in t if "norm" in k]
    assert len(norms) > 10
    for k in norms:
        if k.startswith("language_model"):
            assert t[k].abs().min() > 0 and t[k].std() > 0.1, k  # RMSNorm offsets != 0
        elif k.endswith("weight"):
            assert not torch.allclose(t[k], torch.ones_like(t[k])), k  # LayerNorm gains != 1
    for k in (k for k in t if k.endswith("bias")):
        assert t[k].abs().max() > 0.05, k


def test_sliding_window_changes_logits(hf_checkpoint):
    plain, windowed = hf_checkpoint(version=2), hf_checkpoint(version=2, sliding_window=8)
    a, b = _tensors(plain), _tensors(windowed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same weights
    cfg = json.loads((hf_checkpoint(version=2, sliding_window=8, layout="flat") / "config.json").read_text())
    assert cfg["text_config"]["sliding_window"] == 8
    assert cfg["text_config"]["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    inputs = _inputs(16, 28)  # 32 tokens > window 8
    la, lb = _logits(load_hf_model(plain), inputs), _logits(load_hf_model(windowed), inputs)
    diff = (la - lb).abs().amax(-1)
    assert diff.max() > 0.1
    # the hub-style classic config (no layer_types) must mean the same as the explicit one
    lf = _logits(load_hf_model(hf_checkpoint(version=2, sliding_window=8, layout="flat")), inputs)
    assert torch.equal(lb, lf)
    assert json.loads((windowed / "config.json").read_text())["text_config"].get("layer_types") is None


def test_softcaps_change_logits(hf_checkpoint):
    model = load_hf_model(hf_checkpoint(version=2))
    inputs = _inputs(16, 28)
    capped = _logits(model, inputs)
    final_cap = model.config.text_config.final_logit_softcapping
    assert capped.abs().max() < final_cap
    model.config.text_config.final_logit_softcapping = None
    raw = _logits(model, inputs)
    assert raw.abs().max() > final_cap and (raw - capped).abs().max() > 1.0
    assert torch.allclose(final_cap * torch.tanh(raw / final_cap), capped, atol=1e-5)
    for layer in model.model.language_model.layers:
        layer.self_attn.attn_logit_softcapping = None
    no_attn_cap = _logits(model, inputs)
    assert (no_attn_cap - raw).abs().max() > 0.5


def test_top_hidden_mismatch(hf_checkpoint):
    folder = hf_checkpoint(version=2, top_hidden_mismatch=True)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["hidden_size"] != cfg["text_config"]["hidden_size"] == TEXT_D == cfg["projection_dim"]
    model = load_hf_model(folder)
    assert model.config.hidden_size != model.config.text_config.hidden_size
    inputs = _inputs(16, 28)
    assert torch.equal(_logits(model, inputs), _logits(load_hf_model(hf_checkpoint(version=2)), inputs))


def test_image_size_56(hf_checkpoint):
    folder = hf_checkpoint(version=1, image_size=56, layout="flat")
    assert _keys(folder)["vision_tower.embeddings.position_embedding.weight"] == (64, 40)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["text_config"]["num_image_tokens"] == 64 and cfg["vision_config"]["image_size"] == 56
    logits = _logits(load_hf_model(folder), _inputs(64, 56))
    assert torch.isfinite(logits).all()


def test_sample_images(sample_images, sample_images_by_name):
    modes = {im.mode for im in sample_images}
    assert {"RGB", "RGBA", "L", "P"} <= modes
    assert any(im.width != im.height for im in sample_images)
    assert any(im.width < im.height for im in sample_images) and any(im.width > im.height for im in sample_images)
    assert np.asarray(sample_images_by_name["astronaut"]).std() > 20  # a real photo, not a flat fill
