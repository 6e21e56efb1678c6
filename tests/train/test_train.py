"""Fine-tuning (pg_edge/train): the suffix-only loss against transformers, the training mask,
what each mode trains, learning a small task, exact resume, exports, and bad input.

Tiny fixtures only (D=48, 16 image tokens at 28 px). The learning test is the slow one (~1 min).
"""
from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from pg_edge.errors import PgEdgeError
from pg_edge.checkpoint.loader import load_model
from pg_edge.inputs.tokenizer import Tokenizer
from pg_edge.train import LoraSettings, ModeSpec, TrainConfig, Trainer, load_dataset
from pg_edge.train.data import DataError, batch_indices
from pg_edge.train.evaluate import greedy_predictions
from pg_edge.adapters import load_adapters
from pg_edge.train.export import save_adapters, save_fused
from pg_edge.train.loss import loss_inputs, suffix_loss, suffix_targets, token_nll
from train_helpers import write_colour_set, write_jsonl

N_IMG = 16  # image tokens of the 28 px fixtures


def _data(folder, tokenizer, **kw):
    return load_dataset(folder, tokenizer, 28, N_IMG, **kw)


def _nll(model, batch) -> np.ndarray:
    """float[B, L] per-target nll of a batch."""
    args = loss_inputs(batch)
    args.pop("weights")
    return np.array(token_nll(model, **args))


@pytest.fixture
def mixed_set(tmp_path, sample_images):
    """Examples with different prefix and suffix lengths (in a batch, all but the longest get
    padding); the last one is longer than all others."""
    for name, img in zip("abc", sample_images[:3]):
        img.convert("RGB").save(tmp_path / f"{name}.png")
    rows = [
        {"image": "a.png", "prefix": "colour", "suffix": "red"},
        {"image": "b.png", "prefix": "answer en what is in the image?", "suffix": "a cat on a sofa"},
        {"image": "c.png", "prefix": "detect cat", "suffix": "<loc0012><loc0100><loc0500><loc1000> cat"},
        {"image": "a.png", "prefix": "caption en",
         "suffix": "a long caption about an astronaut standing in a white suit beside a flag and a window"},
    ]
    return write_jsonl(tmp_path / "mixed.jsonl", rows)


# -- the loss ---------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
def test_loss_matches_transformers(version, converted, hf_checkpoint, mixed_set):
    import torch
    from fixtures.checkpoints import load_hf_model

    folder = converted(version=version)
    model = load_model(folder)[0]
    batch = _data(mixed_set, Tokenizer(folder)).batch([0, 1, 2])
    assert not batch.valid.all() and len(set(batch.mask_ar.argmax(1))) == 3  # padding, 3 prefix lengths
    ours = {norm: float(suffix_loss(model, batch, norm)) for norm in ("token", "example")}

    hf = load_hf_model(hf_checkpoint(version=version))
    ids = torch.tensor(batch.input_ids, dtype=torch.long)
    labels = ids.masked_fill(~torch.tensor(batch.loss_mask), -100)
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=torch.tensor(batch.pixel_values).permute(0, 3, 1, 2),
                 attention_mask=torch.tensor(batch.valid, dtype=torch.long),
                 token_type_ids=torch.tensor(batch.mask_ar, dtype=torch.long), labels=labels)
    # transformers: labels shifted left inside the loss, mean over the label tokens.
    rel = abs(ours["token"] - out.loss.item()) / out.loss.item()
    # big_vision's per-example mean, from transformers' logits with the same shift.
    shifted = labels[:, 1:]
    logp = out.logits[:, :-1].float().log_softmax(-1)
    nll = -logp.gather(-1, shifted.clamp(min=0)[..., None])[..., 0]
    live = (shifted != -100).float()
    ref_example = ((nll * live).sum(1) / live.sum(1)).mean().item()
    rel_ex = abs(ours["example"] - ref_example) / ref_example
    print(f"PG{version}: loss {ours['token']:.6f} vs transformers {out.loss.item():.6f} (rel {rel:.2e}); "
          f"per-example {ours['example']:.6f} vs {ref_example:.6f} (rel {rel_ex:.2e})")
    assert rel <= 1e-4 and rel_ex <= 1e-4


@pytest.mark.parametrize("version", [1, 2])
def test_training_mask(version, converted, mixed_set):
    folder = converted(version=version)
    model, tok = load_model(folder)[0], Tokenizer(folder)
    data = _data(mixed_set, tok)
    batch = data.batch([1])  # "answer en ..." -> "a cat on a sofa" <eos>
    pos, tgt, live = suffix_targets(batch)
    P = len(data.prompts[1])
    # The "\n" that ends the prefix predicts the first suffix token; eos is the last target.
    assert batch.input_ids[0, P - 1] == tok.newline_ids[-1] and pos[0, 0] == P - 1
    assert tgt[0, 0] == batch.input_ids[0, P] and tgt[0, -1] == tok.eos_id and live.all()
    base = _nll(model, batch)

    k = len(data.suffixes[1]) - 2  # the last suffix token before eos
    later = replace(batch, input_ids=batch.input_ids.copy())
    later.input_ids[0, P + k] = tok.encode("dog")[0]
    got = _nll(model, later)
    np.testing.assert_allclose(got[0, :k], base[0, :k], rtol=0, atol=1e-5)  # no look-ahead
    assert abs(got[0, k] - base[0, k]) > 1e-3  # its own target changed

    prefix = replace(batch, input_ids=batch.input_ids.copy())
    prefix.input_ids[0, N_IMG + 1] = tok.encode("what")[0]  # first text token after <bos>
    got = _nll(model, prefix)
    assert (np.abs(got - base) > 1e-4).all()  # every suffix token sees the whole prefix

    # Padding is never a target and changes nothing: the row alone == the row padded in a batch.
    padded = data.batch([1, 3])
    assert not padded.valid[0].all()
    got = _nll(model, padded)
    np.testing.assert_allclose(got[0, :base.shape[1]], base[0], rtol=0, atol=1e-4)
    assert not padded.loss_mask[~padded.valid].any()


def test_empty_answer_trains_eos_alone(converted, tmp_path, sample_images):
    """A line whose suffix is empty (or blank) is accepted: its one target is `<eos>`,
    predicted by the "\n" that ends the prefix."""
    folder = converted(version=2)
    tok = Tokenizer(folder)
    sample_images[0].convert("RGB").save(tmp_path / "a.png")
    data = _data(write_jsonl(tmp_path / "e.jsonl", [
        {"image": "a.png", "prefix": "detect cat", "suffix": ""},
        {"image": "a.png", "prefix": "detect dog", "suffix": "  "},
        {"image": "a.png", "prefix": "detect cat", "suffix": "<loc0012><loc0100><loc0500><loc1000> cat"}]), tok)
    assert data.suffixes[0] == data.suffixes[1] == [tok.eos_id]
    assert list(data.loss_tokens([0, 1, 2])) == [1, 1, 6]
    batch = data.batch([0, 2])
    pos, tgt, live = suffix_targets(batch)
    P = len(data.prompts[0])
    assert batch.loss_mask[0].sum() == 1 and batch.input_ids[0, P] == tok.eos_id
    assert pos[0, 0] == P - 1 and batch.input_ids[0, P - 1] == tok.newline_ids[-1]
    assert tgt[0, 0] == tok.eos_id and list(live[0]) == [True] + [False] * (live.shape[1] - 1)
    assert np.isfinite(_nll(load_model(folder)[0], batch)[0, 0])


# -- what trains ------------------------------------------------------------------------------
DEC = r"language_model\.model\.layers\.\d+\."
VIS = r"vision_tower\.vision_model\.encoder\.layers\.\d+\."
ATTN = re.compile(DEC + r"self_attn\.[qkvo]_proj\.weight")
DEC_LORA = re.compile(DEC + r"(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.lora_[ab]")
VIS_LORA = re.compile(VIS + r"(self_attn\.([qkv]|out)_proj|mlp\.fc[12])\.lora_[ab]")
CONN_LORA = re.compile(r"multi_modal_projector\.linear\.lora_[ab]")


def expected_trainable(mode: str, freeze_vision: bool, names: list[str]) -> set[str]:
    """The documented rule (pg_edge/adapters.py), written out independently."""
    if mode == "attn":
        return {k for k in names if ATTN.fullmatch(k)}
    if mode == "full":
        return {k for k in names if not (freeze_vision and k.startswith("vision_tower."))}
    pats = [DEC_LORA, CONN_LORA] + ([] if freeze_vision else [VIS_LORA])
    return {k for k in names if any(p.fullmatch(k) for p in pats)}


@pytest.mark.parametrize("mode,freeze", [("attn", False), ("lora", False), ("lora", True), ("full", False),
                                         ("full", True)])
def test_step_updates_exactly_the_trained_parameters(mode, freeze, converted, tmp_path):
    folder = converted(version=1)
    model = load_model(folder)[0]
    data = _data(write_colour_set(tmp_path, 4, seed=0), Tokenizer(folder))
    cfg = TrainConfig.for_mode(mode, optimizer="adamw", lr=1e-3, steps=2, batch_size=2, warmup=0)
    trainer = Trainer(model, ModeSpec(mode, freeze), cfg, data, quiet=True)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    want = expected_trainable(mode, freeze, list(before))
    assert set(trainer.trainable) == want and want
    if mode == "lora":  # LoRA on every decoder linear and the connector, on SigLIP unless frozen
        n_dec = 7 * len(model.language_model.model.layers)
        n_vis = 0 if freeze else 6 * len(model.vision_tower.vision_model.encoder.layers)
        assert len(want) == 2 * (n_dec + 1 + n_vis)
    trainer.train_step()
    trainer.train_step()  # LoRA's A only moves once B is non-zero
    after = dict(tree_flatten(model.parameters()))
    assert set(after) == set(before)
    changed = {k for k in before if not np.array_equal(before[k], np.array(after[k]))}
    assert changed == want, (sorted(changed - want)[:3], sorted(want - changed)[:3])


def _quantized_folder(folder, out):
    """The tiny model with o_proj 4-bit (the only width a group size divides), written as a
    quantized converted folder (the `quantization` section + `.scales`/`.biases`)."""
    from pg_edge.checkpoint.folder import SIDE_FILES

    model = load_model(folder)[0]
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: p.endswith("o_proj"))
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    raw = json.loads((folder / "config.json").read_text())
    raw["quantization"] = {"group_size": 32, "bits": 4, "mode": "affine"}
    (out / "config.json").write_text(json.dumps(raw))
    for name in SIDE_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, out / name)
    return out


def test_qlora_on_a_quantized_base(converted, tmp_path):
    import pg_edge

    qdir = _quantized_folder(converted(version=1), tmp_path / "q4")
    data = _data(write_colour_set(tmp_path / "d", 4, seed=0), Tokenizer(qdir))
    batch = data.batch([0, 1])
    with pytest.raises(PgEdgeError, match="quantized.*lora"):
        Trainer(load_model(qdir)[0], ModeSpec("attn"), TrainConfig.for_mode("attn", steps=1, batch_size=2), data,
                quiet=True)
    model = pg_edge.load(qdir).model
    assert isinstance(model.language_model.model.layers[0].self_attn.o_proj, nn.QuantizedLinear)
    base = _logits(model, batch)
    trainer = Trainer(model, ModeSpec("lora", True), TrainConfig.for_mode("lora", steps=3, batch_size=2, lr=1e-2),
                      data, quiet=True)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    assert "language_model.model.layers.0.self_attn.o_proj.linear.scales" in before
    trainer.fit()
    changed = {k for k, v in tree_flatten(model.parameters()) if not np.array_equal(before[k], np.array(v))}
    assert changed == set(trainer.trainable) and all(k.endswith(("lora_a", "lora_b")) for k in changed)
    assert any(".o_proj.lora_b" in k for k in changed)  # adapters on the quantized layers train too
    model.eval()
    trained = _logits(model, batch)

    # Fused: LoRA merged into o_proj and re-quantized at the base's 4 bits; a normal folder.
    save_fused(model, qdir, tmp_path / "fused")
    fused = pg_edge.load(tmp_path / "fused").model
    o_proj = fused.language_model.model.layers[0].self_attn.o_proj
    assert isinstance(o_proj, nn.QuantizedLinear) and o_proj.bits == 4 and o_proj.group_size == 32
    moved, err = np.abs(trained - base).max(), np.abs(_logits(fused, batch) - trained).max()
    print(f"QLoRA: training moved logits by {moved:.3f}; fused + re-quantized differs by {err:.3f}")
    assert err < 0.25 * moved


# -- learning ---------------------------------------------------------------------------------
def _blank_red(path):
    """The colour set with every "red" answer empty ("nothing to name")."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return write_jsonl(path, [{**r, "suffix": "" if r["suffix"] == "red" else r["suffix"]} for r in rows])


def test_learns_colour_task(converted, tmp_path):
    """Learns 'colour -> green/blue, and an EMPTY answer on red' from 48 images: full
    fine-tuning with SigLIP frozen. The empty answers train `<eos>` alone.

    AdamW lr 1e-2 reaches 100% exact match by ~step 14 on three different random fixture
    inits (seeds 0 and 1, and an older fixture fill) with "red" named; with it empty, 30 steps
    left 1 of 10 red images answered, 40 steps none. Attention-only (lr 6e-2, 50 steps) also
    learns the named task but needs ~35 steps and is more sensitive to the random init."""
    folder = converted(version=1)
    tok = Tokenizer(folder)
    train = _data(_blank_red(write_colour_set(tmp_path / "train", 48, seed=0)), tok)
    valid = _data(_blank_red(write_colour_set(tmp_path / "valid", 30, seed=1)), tok)
    model = load_model(folder)[0]
    cfg = TrainConfig.for_mode("full", optimizer="adamw", lr=1e-2, steps=40, batch_size=6, warmup=0.1)
    trainer = Trainer(model, ModeSpec("full", freeze_vision=True), cfg, train, valid, quiet=True)
    t0 = time.perf_counter()
    start = trainer.validate()
    trainer.fit()
    end = trainer.history[-1]
    took = time.perf_counter() - t0
    model.eval()
    preds = greedy_predictions(model, valid, max_new_tokens=4)
    refs = [ex.suffix for ex in valid.examples]
    empty = [p.strip() == "" for p, r in zip(preds, refs) if r == ""]
    named = [p.strip() == r for p, r in zip(preds, refs) if r]
    print(f"colour task: exact match {start['exact_match']:.2f} -> {end['exact_match']:.2f}, val loss "
          f"{start['val_loss']:.3f} -> {end['val_loss']:.3f}, {cfg.steps} steps in {took:.1f} s; "
          f"empty answers {np.mean(empty):.2f} of {len(empty)}, colours named {np.mean(named):.2f}")
    assert start["exact_match"] <= 0.34
    assert end["exact_match"] >= 0.9
    assert len(empty) == 10 and np.mean(empty) >= 0.9 and np.mean(named) >= 0.9


# -- resume -----------------------------------------------------------------------------------
def test_resume_continues_with_same_losses(converted, tmp_path):
    folder = converted(version=1)
    data = _data(write_colour_set(tmp_path / "d", 8, seed=0), Tokenizer(folder))
    # Dropout and accumulation make the randomness and the micro-batch order matter too.
    spec = ModeSpec("lora", lora=LoraSettings(rank=4, alpha=8, dropout=0.2))
    cfg = TrainConfig.for_mode("lora", steps=4, batch_size=4, grad_accum=2, lr=3e-3, save_every=2)

    whole = Trainer(load_model(folder)[0], spec, cfg, data, quiet=True)
    whole.fit()
    first = Trainer(load_model(folder)[0], spec, cfg, data, out=tmp_path / "run", quiet=True)
    first.fit(until=2)  # "interrupted" after the checkpoint at step 2
    second = Trainer(load_model(folder)[0], spec, cfg, data, out=tmp_path / "run", quiet=True)
    assert second.resume(tmp_path / "run") == 2
    second.fit()
    losses = [r["loss"] for r in whole.history]
    resumed = [r["loss"] for r in first.history + second.history]
    print(f"uninterrupted {losses}\nresumed       {resumed}")
    np.testing.assert_allclose(resumed, losses, rtol=1e-6, atol=0)
    for (k, a), (_, b) in zip(tree_flatten(whole.model.trainable_parameters()),
                              tree_flatten(second.model.trainable_parameters())):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-7, err_msg=k)

    other = Trainer(load_model(folder)[0], spec, replace(cfg, lr=1e-3), data, quiet=True)
    with pytest.raises(PgEdgeError, match="lr"):
        other.resume(tmp_path / "run")


def test_batch_order_is_a_function_of_seed_and_step():
    a = [batch_indices(10, 4, s, seed=3) for s in range(5)]
    assert all(np.array_equal(x, batch_indices(10, 4, s, seed=3)) for s, x in enumerate(a))
    flat = np.concatenate(a[:5])[:20]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # epochs
    assert not np.array_equal(a[0], batch_indices(10, 4, 0, seed=4))


# -- exports ----------------------------------------------------------------------------------
def _logits(model, batch) -> np.ndarray:
    out = model(mx.array(batch.input_ids), mx.array(batch.pixel_values), mask_ar=mx.array(batch.mask_ar),
                valid=mx.array(batch.valid))
    return np.array(out)


def test_exports_reproduce_the_trained_model(converted, tmp_path):
    import pg_edge

    folder = converted(version=2)
    tok = Tokenizer(folder)
    data = _data(write_colour_set(tmp_path / "d", 4, seed=0), tok)
    batch = data.batch([0, 1])
    base = _logits(load_model(folder)[0], batch)
    model = load_model(folder)[0]
    spec = ModeSpec("lora", lora=LoraSettings(rank=4, alpha=8))
    trainer = Trainer(model, spec, TrainConfig.for_mode("lora", steps=3, batch_size=2, lr=1e-2), data, quiet=True)
    trainer.fit()
    model.eval()
    trained = _logits(model, batch)
    assert np.abs(trained - base).max() > 1e-2  # training changed the outputs

    save_adapters(model, spec, tmp_path / "adapters", base_model=str(folder))
    again = load_model(folder)[0]
    assert load_adapters(again, tmp_path / "adapters") == spec
    np.testing.assert_allclose(_logits(again, batch), trained, rtol=0, atol=1e-5)
    with_adapters = pg_edge.load(folder, adapters=tmp_path / "adapters")  # the public path
    np.testing.assert_allclose(_logits(with_adapters.model, batch), trained, rtol=0, atol=1e-5)

    save_fused(model, folder, tmp_path / "fused")
    pg = pg_edge.load(tmp_path / "fused")
    assert not any("LoRA" in type(m).__name__ for _, m in pg.model.named_modules())
    np.testing.assert_allclose(_logits(pg.model, batch), trained, rtol=0, atol=1e-3)
    with pytest.raises(PgEdgeError, match="exists"):
        save_fused(model, folder, tmp_path / "fused")


# -- bad input --------------------------------------------------------------------------------
def _cli(*argv) -> int:
    from pg_edge.cli import main

    return main(["finetune", *map(str, argv)])


@pytest.mark.parametrize("bad,reason", [
    ("not json at all", "not valid JSON"),
    ({"image": "img/0.png", "prefix": "colour", "suffix": None}, "'suffix' must be a string"),
    ({"image": "img/missing.png", "prefix": "colour", "suffix": "red"}, "image not found"),
    ({"image": "img/0.png", "suffix": "red"}, "missing key(s) 'prefix'"),
    ({"image": "labels.jsonl", "prefix": "colour", "suffix": "red"}, "cannot read image"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_data_line_is_named_and_nothing_is_written(bad, reason, converted, tmp_path, capsys):
    folder = converted(version=1)
    good = json.loads(write_colour_set(tmp_path / "d", 3, seed=0).read_text().splitlines()[0])
    bad = bad if isinstance(bad, (str, dict)) else json.dumps(bad)
    data = write_jsonl(tmp_path / "d" / "train.jsonl", [good, good, bad, good])
    out = tmp_path / "out"
    assert _cli(folder, "--data", data, "--train", "attn", "-o", out, "--quiet") == 2
    err = capsys.readouterr().err
    assert f"train.jsonl:3: {reason}" in err and "Traceback" not in err, err
    assert not out.exists()


def test_all_bad_lines_reported_at_once(converted, tmp_path, capsys):
    folder = converted(version=1)
    write_colour_set(tmp_path / "d", 3, seed=0)
    data = write_jsonl(tmp_path / "d" / "bad.jsonl", ["{", {"image": "img/0.png", "prefix": "", "suffix": 3},
                                                       {"image": "img/0.png", "prefix": "p", "suffix": "ok"},
                                                       {"image": "nope.png", "prefix": "p", "suffix": "s"}])
    with pytest.raises(DataError) as info:
        _data(data, Tokenizer(folder))
    msg = str(info.value)
    assert "3 bad line(s)" in msg and "bad.jsonl:1:" in msg and "bad.jsonl:2:" in msg and "bad.jsonl:4:" in msg
    # A bad --valid file is also refused before anything is written.
    out = tmp_path / "out"
    assert _cli(folder, "--data", tmp_path / "d", "--valid", data, "--train", "lora", "-o", out, "--quiet") == 2
    assert "bad.jsonl:1: not valid JSON" in capsys.readouterr().err and not out.exists()
    assert _cli(folder, "--data", tmp_path / "d" / "img", "--train", "lora", "-o", out, "--quiet") == 2  # no labels.jsonl
    assert "without labels.jsonl" in capsys.readouterr().err and not out.exists()


def test_cli_trains_checkpoints_resumes_and_exports(converted, tmp_path):
    import pg_edge

    folder = converted(version=1)
    data = write_colour_set(tmp_path / "d", 6, seed=0).parent
    out = tmp_path / "run"
    common = ["--data", data, "--batch-size", 2, "--lr", 1e-3, "-o", out, "--quiet"]
    assert _cli(folder, "--train", "attn", "--steps", 2, *common) == 0
    assert (out / "checkpoints" / "step-000002" / "state.json").is_file() and (out / "model" / "config.json").is_file()
    assert _cli(folder, "--train", "attn", "--steps", 2, *common) == 2  # exists: needs --resume / --force
    assert _cli(folder, "--train", "attn", "--steps", 3, "--resume", out, *common) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    pg_edge.load(out / "model")  # the fused export is a normal converted folder
    shutil.rmtree(out)
    assert _cli(folder, "--train", "lora", "--steps", 1, "--lora-rank", 2, *common) == 0
    assert json.loads((out / "adapters" / "adapter_config.json").read_text())["lora"]["rank"] == 2
