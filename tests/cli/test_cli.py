"""The `pg-edge` command line on converted fixtures, and its one convention: every command takes
its model (or source) first, -q is the quantization bits wherever it exists, --help shows every
default, --debug goes before or after the command, a mistake prints the command's own usage."""
import argparse
import json
import subprocess
import sys
from importlib import metadata

import pytest

from pg_edge.cli import build_parser, main
from pg_edge.errors import PgEdgeError


def test_run_json_reports_text_tokens_timings_memory(converted, sample_images, tmp_path, capsys):
    img = tmp_path / "img.png"
    sample_images[0].save(img)
    code = main(["run", str(converted(version=2)), "--image", str(img), "--prompt", "caption en",
                 "--max-tokens", "6", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    # The fixture model greedily emits 6 tokens before any eos: a run that generates nothing fails.
    assert len(out["tokens"]) == out["generation_tokens"] == 6 and out["finish_reason"] == "length"
    assert out["text"] and isinstance(out["text"], str)
    assert set(out["timings"]) >= {"prefill_s", "generation_s", "generation_tps"}
    assert out["peak_memory_gb"] > 0


def test_run_streams_text_matching_json(converted, sample_images, tmp_path, capsys):
    img = tmp_path / "img.png"
    sample_images[1].save(img)
    args = ["run", str(converted(version=1)), "--image", str(img), "--prompt", "ocr", "--max-tokens", "8"]
    assert main(args) == 0
    streamed = capsys.readouterr().out
    assert main(args + ["--json"]) == 0
    assert streamed == json.loads(capsys.readouterr().out)["text"] + "\n"


def test_entry_point_runs_as_a_program(hf_checkpoint, tmp_path):
    """The real console path: a subprocess, as a user types it."""
    out = tmp_path / "conv"
    proc = subprocess.run([sys.executable, "-m", "pg_edge.cli", "convert", str(hf_checkpoint(version=1)),
                           "-o", str(out), "--dtype", "float16"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file() and (out / "tokenizer.model").is_file()
    bad = subprocess.run([sys.executable, "-m", "pg_edge.cli", "convert", str(tmp_path / "missing"), "-o",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def _modules_after(code: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sys.modules))"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_cli_imports_only_the_chosen_command(converted, sample_images, tmp_path):
    """`pg-edge --help` / `run --help` import no pg_edge model code at all; a real `pg-edge run`
    imports the runtime but never the trainer, the converters, the quantizer, nor transformers and
    torch (which mlx-lm's package init would import: pg_edge._mlx_lm)."""
    helped = _modules_after("from pg_edge.cli import main\ntry:\n    main(['run', '--help'])\n"
                            "except SystemExit:\n    pass")
    assert "pg_edge.cli.commands.run" in helped
    assert not {"mlx", "mlx_lm", "transformers", "torch", "pg_edge.pipeline", "pg_edge.cli.commands.tasks"} & helped
    img = tmp_path / "img.png"
    sample_images[0].save(img)
    ran = _modules_after(f"from pg_edge.cli import main\nassert main(['run', {str(converted(version=2))!r}, "
                         f"'--image', {str(img)!r}, '--prompt', 'caption en', '--max-tokens', '2']) == 0")
    assert "pg_edge.pipeline" in ran
    heavy = sorted(m for m in ran if m.split(".")[0] in ("transformers", "torch")
                   or m.startswith(("pg_edge.convert", "pg_edge.quantize", "pg_edge.train",
                                    "mlx_lm.tuner", "mlx_lm.utils", "mlx.optimizers")))
    assert heavy == []


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.option_strings
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


def test_q_is_the_bits_wherever_it_exists_and_quiet_has_no_short_form():
    with_q = []
    for name, parser in subcommands().items():
        for a in options(parser):
            if "-q" in a.option_strings:
                assert a.dest == "bits", name
                with_q.append(name)
            if a.dest == "quiet":
                assert a.option_strings == ["--quiet"], name
    assert sorted(with_q) == ["convert", "quantize"]


def test_every_command_takes_its_model_or_source_first():
    for name, parser in subcommands().items():
        first = next(a for a in parser._actions if not a.option_strings)
        assert first.dest == ("src" if name in ("convert", "convert-vae", "quantize") else "model"), name
    label = [a.dest for a in subcommands()["label"]._actions if not a.option_strings]
    assert label == ["model", "folder"]


def test_required_options_show_as_required_in_usage(capsys):
    for name, parser in subcommands().items():
        usage = " ".join(parser.format_usage().split())
        for a in options(parser):
            if a.required:
                assert a.option_strings[0] in usage and f"[{a.option_strings[0]}" not in usage, name
    usage = " ".join(subcommands()["finetune"].format_usage().split())
    assert "--train {attn,lora,full}" in usage and "[--train" not in usage
    with pytest.raises(SystemExit) as e:
        main(["finetune", "m", "--data", "d", "-o", "out"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: pg-edge finetune") and "--train" in err


def test_help_shows_every_default():
    """Each option has a help text; where its default is a value (not absent, off, none repeated
    or the recipe's), the help as printed names it."""
    from pg_edge.quantize.recipes import UNSET

    shown = 0
    for name, parser in subcommands().items():
        formatter = parser._get_formatter()
        for a in options(parser):
            assert (a.help or "").strip(), f"{name} {a.option_strings[0]} has no help"
            if a.default is None or a.default is False or a.default in ([], argparse.SUPPRESS, UNSET):
                continue
            text = " ".join(formatter._expand_help(a).split())
            values = {str(a.default)} | ({f"{a.default:g}"} if isinstance(a.default, float) else set())
            assert "default" in text and any(v in text for v in values), f"{name} {a.option_strings[0]}: {text}"
            shown += 1
    assert shown > 30
    label_help = " ".join(subcommands()["label"].format_help().split())
    assert "most tokens to generate (default 128)" in label_help  # label's own default, not run's
    assert "(default: bfloat16)" in " ".join(subcommands()["convert"].format_help().split())


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"pg-edge {metadata.version('pg-edge')}\n"


def test_a_bare_pg_edge_prints_the_help(capsys):
    for argv in ([], ["--debug"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: pg-edge") and all(c in out for c in ("convert-vae", "finetune", "label"))


def test_debug_works_before_or_after_the_command(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PG_EDGE_DEBUG", raising=False)
    argv = ["run", "demo", "--image", str(tmp_path / "missing.png"), "--prompt", "caption en"]
    assert main(argv) == 2
    assert "error: image not found" in capsys.readouterr().err
    for debugged in (["--debug", *argv], [*argv, "--debug"], ["run", "--debug", *argv[1:]]):
        with pytest.raises(PgEdgeError, match="image not found"):  # the traceback, not one line
            main(debugged)


@pytest.mark.parametrize("argv,unknown", [
    (["run", "demo", "--image", "a.png", "--prompt", "caption en", "--bogus"], "--bogus"),
    (["label", "demo", "photos", "--detect", "cat", "-o", "x.json", "--model", "demo"], "--model demo"),
    (["finetune", "demo", "--data", "d", "--train", "attn", "-o", "out", "-q"], "-q"),
    (["quantize", "src", "-o", "out", "--bits", "4", "extra"], "extra"),
])
def test_an_unknown_option_prints_the_commands_usage(argv, unknown, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"usage: pg-edge {argv[0]} ")
    assert err.endswith(f"pg-edge {argv[0]}: error: unrecognized arguments: {unknown}\n")
