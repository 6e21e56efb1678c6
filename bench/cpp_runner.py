"""Time to first token and decode speed: the C++ runner (apps/cpp) vs `pg-edge run`, same model,
same image and prompt, measured in the same run.

    .venv/bin/python bench/cpp_runner.py MODEL [MODEL ...]              # converted folders
    .venv/bin/python bench/cpp_runner.py --synthetic pg2-3b-224 --layers 2 --tokenizer-from FOLDER [--q4]
    .venv/bin/python bench/cpp_runner.py --graph-sizes pg2-3b-224 --tokenizer-from FOLDER

Each model is exported (`pg-edge export`) to a temporary bundle; then both programs run as fresh
processes `--runs` times each, interleaved (`pg-edge run --json` and
`apps/cpp/build/pg-edge-run --json`), greedy, `--max-tokens` tokens; the medians and the best
run of their own timings are printed:
TTFT = vision + prefill seconds (image in to first token out), decode tok/s over the generated
tokens after the first, and the wall time of the whole process (imports and loading included).
Both print the same token ids (checked). `--synthetic` builds a layer-cut model at the real
widths (random bf16 weights; `--q4`: quantized with the default recipe) with the tokenizer of
another folder, since official weights cannot be downloaded here.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

RUNNER = ROOT / "apps" / "cpp" / "build" / "pg-edge-run"


def synthetic(model: str, layers: int, tokenizer_from: Path, out: Path, q4: bool) -> Path:
    """A layer-cut PaliGemma at full widths with random bf16 weights, as a converted folder."""
    from quantize_sizes import config_raw

    folder = _random_folder(config_raw(model, vision_layers=layers, text_layers=layers), tokenizer_from,
                            out / "float")
    if not q4:
        return folder
    from pg_edge.quantize import quantize

    quantize(folder, out / "q4", probes=0)
    return out / "q4"


def graph_sizes(model: str, tokenizer_from: Path, tmp: Path) -> None:
    """Bytes of each .mlxfn at the real layer counts of `model`: a graph holds operations, not
    weights, so its size follows the layer count; widths are narrowed to keep this quick."""
    from quantize_sizes import config_raw

    from pg_edge.export import export_bundle

    raw = config_raw(model)
    raw["vision_config"].update(hidden_size=32, intermediate_size=64, num_attention_heads=2)
    raw["text_config"].update(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16)
    raw["projection_dim"] = 32
    folder = _random_folder(raw, tokenizer_from, tmp / "narrow")
    bundle = export_bundle(folder, tmp / "narrow_bundle")
    sizes = {f.name: f.stat().st_size for f in sorted(bundle.glob("*.mlxfn"))}
    print(f"\n{model} at its real layer counts: " + ", ".join(f"{k} {v / 1e3:.0f} kB" for k, v in sizes.items())
          + f", total {sum(sizes.values()) / 1e6:.2f} MB")


def _random_folder(raw: dict, tokenizer_from: Path, out: Path) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from pg_edge.checkpoint.folder import FolderWriter
    from pg_edge.model.config import PaliGemmaConfig
    from pg_edge.model.paligemma import PaliGemmaModel

    raw["text_config"].update(bos_token_id=2, eos_token_id=1, pad_token_id=0)
    model = PaliGemmaModel(PaliGemmaConfig.from_dict(raw))
    mx.random.seed(0)
    weights = {k: (mx.random.normal(v.shape) * 0.02).astype(mx.bfloat16) for k, v in tree_flatten(model.parameters())}
    with FolderWriter(out, source="synthetic", converter="bench") as w:
        w.add_shard(weights)
        w.finish(raw, source_folder=Path(tokenizer_from))
    return out


def run_once(cmd: list[str]) -> tuple[dict, list[int]]:
    t0 = time.perf_counter()
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    t = out["timings"]
    return {"ttft_s": t["vision_s"] + t["prefill_s"], "decode_tps": t["generation_tps"],
            "wall_s": time.perf_counter() - t0}, out["tokens"]


def summary(results: list[dict]) -> dict:
    """Medians, and the best run (least disturbed by other processes on a shared machine)."""
    out = {k: statistics.median(r[k] for r in results) for k in results[0]}
    out["best_ttft_s"] = min(r["ttft_s"] for r in results)
    out["best_decode_tps"] = max(r["decode_tps"] for r in results)
    return out


def bench(folder: Path, image: Path, prompt: str, max_tokens: int, runs: int) -> None:
    from pg_edge.export import export_bundle

    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_bundle(folder, Path(tmp) / "bundle", max_tokens=max(max_tokens, 256))
        size = sum(f.stat().st_size for f in bundle.iterdir()) / 1e6
        common = ["--image", str(image), "--prompt", prompt, "--max-tokens", str(max_tokens), "--json"]
        py_cmd = [sys.executable, "-m", "pg_edge.cli", "run", str(folder), *common]
        cc_cmd = [str(RUNNER), str(bundle), *common]
        py_runs, cc_runs = [], []
        for _ in range(runs):  # interleaved, so a busy moment hits both alike
            r, py_tokens = run_once(py_cmd)
            py_runs.append(r)
            r, cc_tokens = run_once(cc_cmd)
            cc_runs.append(r)
        py, cc = summary(py_runs), summary(cc_runs)
    same = "same ids" if py_tokens == cc_tokens else "IDS DIFFER"
    print(f"\n{folder.name}: bundle {size:.1f} MB, {len(cc_tokens)} tokens, {same} ({runs} interleaved runs)")
    cols = ("ttft_s", "best_ttft_s", "decode_tps", "best_decode_tps", "wall_s")
    print(f"{'':12} {'TTFT s':>9} {'best':>7} {'decode tok/s':>13} {'best':>7} {'process wall s':>15}")
    for name, r in (("python", py), ("c++", cc)):
        print(f"{name:12} {r['ttft_s']:9.3f} {r['best_ttft_s']:7.3f} {r['decode_tps']:13.1f} "
              f"{r['best_decode_tps']:7.1f} {r['wall_s']:15.2f}")
    ratio = {k: cc[k] / py[k] for k in cols}
    print(f"{'c++/python':12} {ratio['ttft_s']:9.2f} {ratio['best_ttft_s']:7.2f} {ratio['decode_tps']:13.2f} "
          f"{ratio['best_decode_tps']:7.2f} {ratio['wall_s']:15.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="*", type=Path, help="converted folders")
    p.add_argument("--synthetic", help="e.g. pg2-3b-224 (see bench/quantize_sizes.py for names)")
    p.add_argument("--layers", type=int, default=2, help="SigLIP and decoder layers of --synthetic")
    p.add_argument("--tokenizer-from", type=Path, help="folder whose tokenizer files --synthetic uses")
    p.add_argument("--q4", action="store_true", help="quantize --synthetic (default recipe)")
    p.add_argument("--graph-sizes", help="print the .mlxfn sizes at this model's real layer counts "
                                         "(e.g. pg2-3b-224; needs --tokenizer-from)")
    p.add_argument("--image", type=Path, default=ROOT / "pg_edge" / "assets" / "cat.jpg")
    p.add_argument("--prompt", default="caption en")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    subprocess.run(["make", "-s", "-C", str(ROOT / "apps" / "cpp"), f"PYTHON={sys.executable}"], check=True)
    models = list(args.models)
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            models.append(synthetic(args.synthetic, args.layers, args.tokenizer_from, Path(tmp), args.q4))
        if args.graph_sizes:
            graph_sizes(args.graph_sizes, args.tokenizer_from, Path(tmp))
        for m in models:
            bench(m, args.image, args.prompt, args.max_tokens, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
