"""The `pg-edge` command line on converted fixtures."""
import json
import subprocess
import sys

from apps.cli import main


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
    proc = subprocess.run([sys.executable, "-m", "apps.cli", "convert", str(hf_checkpoint(version=1)),
                           "-o", str(out), "--dtype", "float16"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file() and (out / "tokenizer.model").is_file()
    bad = subprocess.run([sys.executable, "-m", "apps.cli", "convert", str(tmp_path / "missing"), "-o",
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
    helped = _modules_after("from apps.cli import main\ntry:\n    main(['run', '--help'])\n"
                            "except SystemExit:\n    pass")
    assert "apps.commands.run" in helped
    assert not {"mlx", "mlx_lm", "transformers", "torch", "pg_edge.pipeline", "apps.commands.tasks"} & helped
    img = tmp_path / "img.png"
    sample_images[0].save(img)
    ran = _modules_after(f"from apps.cli import main\nassert main(['run', {str(converted(version=2))!r}, "
                         f"'--image', {str(img)!r}, '--prompt', 'caption en', '--max-tokens', '2']) == 0")
    assert "pg_edge.pipeline" in ran
    heavy = sorted(m for m in ran if m.split(".")[0] in ("convert", "quantize", "transformers", "torch")
                   or m.startswith(("pg_edge.train", "mlx_lm.tuner", "mlx_lm.utils", "mlx.optimizers")))
    assert heavy == []
