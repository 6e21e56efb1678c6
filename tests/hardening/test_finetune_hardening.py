"""Issue 23 items 12, 13 and 15 (fine-tuning side): examples checked against the model's context
before any compute, adapters checked against their base at load, deep-nesting and huge-header
data lines, log.jsonl without repeated steps after a resume."""
from __future__ import annotations

import json
import shutil
import struct
import zlib

import pytest

import pg_edge
from pg_edge.errors import PgEdgeError
from pg_edge.checkpoint.loader import load_model
from pg_edge.inputs.tokenizer import Tokenizer
from pg_edge.train import LoraSettings, ModeSpec, TrainConfig, Trainer, load_dataset
from pg_edge.train.data import DataError, Dataset, read_examples
from pg_edge.train.export import save_adapters
from train_helpers import write_colour_set, write_jsonl

N_IMG = 16


def _cli(capsys, *argv) -> tuple[int, list[str]]:
    from pg_edge.cli import main

    code = main(["finetune", *map(str, argv)])
    return code, capsys.readouterr().err.strip().splitlines()


def png_header(path, width: int, height: int):
    """A PNG whose IHDR claims width x height (8-bit RGB) and holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


# -- item 12: the context ---------------------------------------------------------------------
def test_an_example_past_the_context_is_refused_before_any_compute(converted, tmp_path, capsys):
    folder = converted(version=1)
    rows = [json.loads(x) for x in write_colour_set(tmp_path / "d", 3, seed=0).read_text().splitlines()]
    rows[1]["suffix"] = " ".join(["word"] * 20_000)  # the 20,000-word answer
    data = write_jsonl(tmp_path / "d" / "long.jsonl", rows)
    out = tmp_path / "run"
    code, err = _cli(capsys, folder, "--data", data, "--train", "attn", "-o", out, "--quiet")
    assert code == 2 and len(err) == 1, err
    assert "long.jsonl:2" in err[0] and "longer than the model's context of 8,192 tokens" in err[0]
    assert "--max-len" in err[0] and not out.exists()
    code, err = _cli(capsys, folder, "--data", data, "--train", "attn", "--max-len", 9000, "-o", out, "--quiet")
    assert code == 2 and "between 1 and the model's context of 8192" in err[0] and not out.exists()
    # The API too: a Dataset made without the context is checked by the Trainer.
    tok = Tokenizer(folder)
    dataset = Dataset(read_examples(data), tok, 28, N_IMG)
    with pytest.raises(DataError, match="long.jsonl:2"):
        Trainer(load_model(folder)[0], ModeSpec("attn"), TrainConfig.for_mode("attn", steps=1, batch_size=1),
                dataset, quiet=True)
    # --max-len truncates the suffix, so the same data fits.
    assert load_dataset(data, tok, 28, N_IMG, max_len=64, context=8192).suffixes[1][-1] is not None


# -- item 15: data lines ----------------------------------------------------------------------
def test_deep_nesting_and_a_huge_png_header_are_named_lines(converted, tmp_path, capsys):
    folder = converted(version=1)
    good = json.loads(write_colour_set(tmp_path / "d", 2, seed=0).read_text().splitlines()[0])
    png_header(tmp_path / "d" / "huge.png", 100_000, 100_000)
    data = write_jsonl(tmp_path / "d" / "bad.jsonl", [
        good, "[" * 100_000 + "]" * 100_000, {**good, "image": "huge.png"}, good])
    code, err = _cli(capsys, folder, "--data", data, "--train", "attn", "-o", tmp_path / "run", "--quiet")
    assert code == 2 and len(err) == 1, err
    assert "bad.jsonl:2: JSON nested too deeply" in err[0]
    assert "bad.jsonl:3: image" in err[0] and "limit of 100,000,000 pixels" in err[0]
    assert "internal error" not in err[0] and not (tmp_path / "run").exists()


# -- item 15: log.jsonl after a resume --------------------------------------------------------
def test_log_has_each_step_once_after_a_resume(converted, tmp_path):
    folder = converted(version=1)
    data = load_dataset(write_colour_set(tmp_path / "d", 4, seed=0), Tokenizer(folder), 28, N_IMG)
    spec = ModeSpec("lora", lora=LoraSettings(rank=2, alpha=4))
    cfg = TrainConfig.for_mode("lora", steps=4, batch_size=2, lr=1e-3, save_every=2)
    out = tmp_path / "run"
    first = Trainer(load_model(folder)[0], spec, cfg, data, out=out, quiet=True)
    first.fit(until=3)  # checkpoint at 2, step 3 logged, then "killed"
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.')  # a line torn by SIGKILL
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()[:3]] == [1, 2, 3]
    second = Trainer(load_model(folder)[0], spec, cfg, data, out=out, quiet=True)
    assert second.resume(out) == 2
    second.fit()
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# -- item 13: adapters against their base -----------------------------------------------------
@pytest.fixture(scope="module")
def adapters(converted, tmp_path_factory):
    folder = converted(version=1)
    tmp = tmp_path_factory.mktemp("adapters")
    data = load_dataset(write_colour_set(tmp / "d", 2, seed=0), Tokenizer(folder), 28, N_IMG)
    spec = ModeSpec("lora", lora=LoraSettings(rank=2, alpha=4))
    trainer = Trainer(load_model(folder)[0], spec, TrainConfig.for_mode("lora", steps=1, batch_size=2),
                      data, quiet=True)
    trainer.fit()
    return folder, save_adapters(trainer.model, spec, tmp / "adapters", base_model=str(folder))


def _tampered(src, dst, change):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    change(cfg)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_adapters_load_on_their_base(adapters):
    folder, ad = adapters
    assert "base_fingerprint" in json.loads((ad / "adapter_config.json").read_text())
    pg = pg_edge.load(folder, adapters=ad)
    assert pg.generate("pg_edge/demo/samples/shapes_1.png", "colour", max_tokens=2).tokens
    pg.close()


@pytest.mark.parametrize("case,change,words", [
    ("other_base", lambda c: c.update(base_fingerprint="0" * 16), "made for another base model"),
    ("rank", lambda c: c["lora"].update(rank=4), "is not alpha / rank"),  # weights have rank 2
    ("rank_and_scale", lambda c: c["lora"].update(rank=4, scale=1.0), "rank 4 in the config"),
    ("alpha", lambda c: c["lora"].update(alpha=400.0), "is not alpha / rank"),
    ("negative_rank", lambda c: c["lora"].update(rank=-2), "LoRA rank must be a positive integer"),
    ("string_alpha", lambda c: c["lora"].update(alpha="big"), "unexpected LoRA setting"),
    ("mode", lambda c: c.update(mode="everything"), "training mode must be one of"),
    ("format", lambda c: c.pop("format"), "not a pg-edge adapter config"),
])
def test_tampered_adapters_are_one_line_errors(adapters, tmp_path, case, change, words):
    folder, ad = adapters
    bad = _tampered(ad, tmp_path / case, change)
    with pytest.raises(PgEdgeError, match=words) as info:
        pg_edge.load(folder, adapters=bad)
    assert "\n" not in str(info.value)


def test_adapters_of_another_base_are_refused_in_one_line(adapters, converted, tmp_path, capsys):
    _, ad = adapters
    other = converted(version=2)  # another architecture (PaliGemma 2 fixture)
    with pytest.raises(PgEdgeError, match="made for another base model"):
        pg_edge.load(other, adapters=ad)
    # Without the fingerprint (an older file), the tensor shapes still tell.
    bare = _tampered(ad, tmp_path / "bare", lambda c: c.pop("base_fingerprint"))
    with pytest.raises(PgEdgeError, match="has shape|does not fit this model"):
        pg_edge.load(other, adapters=bare)
    from pg_edge.cli import main

    assert main(["run", str(other), "--adapters", str(ad), "--image", "pg_edge/demo/samples/shapes_1.png",
                 "--prompt", "colour", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another base model" in err[0] and "internal error" not in err[0]
