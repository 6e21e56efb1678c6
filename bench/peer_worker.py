"""One measurement of one tool, in its own process (bench/vs_peers.py starts one per figure).

    peer_worker.py run pg_edge FOLDER --tokens 32
    peer_worker.py run mlx_vlm FOLDER --tokens 32
    peer_worker.py run mlx_lm LM_FOLDER --tokens 32 --prompt-tokens 259
    peer_worker.py convert pg_edge HF_FOLDER OUT [--bits 4] [--recipe all4]
    peer_worker.py convert mlx_vlm HF_FOLDER OUT [--bits 4]

Each tool runs through its own public load and generate; the timing method is the same for all:
a warm-up generation (none with --no-warmup), then one timed generation of `--tokens` decode steps after the first
token, with greedy sampling. Prints one line `RESULT {json}` (times in s, memory in GB).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402

from pg_edge.benchmark import Clock, best, bench_image, folder_gb, max_rss_gb, timings  # noqa: E402


def timed_stream(stream) -> dict:
    """Wall/CPU laps of a token stream: (time to the first item, the rest) and the count."""
    clock = Clock()
    first, n = None, 0
    for _ in stream:
        if first is None:
            first = clock.lap()
        n += 1
    return {"first": first, "rest": clock.lap(), "decoded": n - 1}


def run_mlx_vlm(folder: str, prompt: str, tokens: int, repeat: int, warmup: bool = True) -> dict:
    import tempfile

    from mlx_vlm import load, stream_generate

    mx.reset_peak_memory()
    t0 = time.perf_counter()
    model, processor = load(folder)  # lazy=False: evaluates the weights
    load_s = time.perf_counter() - t0
    size = model.config.vision_config.image_size
    image = Path(tempfile.mkdtemp()) / "bench.png"  # mlx-vlm's generate takes image paths
    bench_image(size).save(image)
    inputs = processor(text=[prompt], images=[bench_image(size)], return_tensors="np")
    dtype = model.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype
    pixels = mx.array(inputs["pixel_values"]).astype(dtype).transpose(0, 2, 3, 1)

    def once(n):
        # Vision encode alone: mlx-vlm's own tower + projector on the processed pixels.
        clock = Clock()
        mx.eval(model.multi_modal_projector(model.vision_tower(pixels)[0]))
        vision = clock.lap()
        s = timed_stream(stream_generate(model, processor, prompt, image=[str(image)], max_tokens=n + 1,
                                         temperature=0.0))
        # TTFT = vision + prefill; mlx-vlm encodes the image again inside its prefill, so its
        # time to the first token already contains one vision pass: count that one, not ours.
        r = timings((0.0, 0.0), s["first"], s["rest"], s["decoded"])
        r["vision_s"], r["vision_s_cpu"] = vision
        return r

    if warmup:
        once(2)
    r = best([once(tokens) for _ in range(repeat)])
    return {"load_s": load_s, **r, "prompt_tokens": int(inputs["input_ids"].shape[1])}


def run_mlx_lm(folder: str, tokens: int, prompt_tokens: int, repeat: int, warmup: bool = True) -> dict:
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    mx.reset_peak_memory()
    t0 = time.perf_counter()
    model, tokenizer = load(folder)
    load_s = time.perf_counter() - t0
    ids = mx.array([2] + [(i * 7919) % 200000 + 1000 for i in range(prompt_tokens - 1)])
    sampler = make_sampler(temp=0.0)

    def once(n):
        s = timed_stream(stream_generate(model, tokenizer, ids, max_tokens=n + 1, sampler=sampler))
        return timings((0.0, 0.0), s["first"], s["rest"], s["decoded"])

    if warmup:
        once(2)
    r = best([once(tokens) for _ in range(repeat)])
    return {"load_s": load_s, **r, "vision_s": 0.0, "vision_s_cpu": 0.0, "prompt_tokens": prompt_tokens}


def convert(tool: str, hf: str, out: str, bits: int | None, recipe: str | None) -> dict:
    t0 = time.perf_counter()
    if tool == "pg_edge":
        from pg_edge.cli import main

        argv = ["convert", hf, "-o", out, "--force", "--quiet"]
        if bits:
            argv += ["-q", str(bits), "--probes", "0"] + (["--recipe", recipe] if recipe else [])
        rc = main(argv)
        if rc:
            raise SystemExit(rc)
    else:
        from mlx_vlm.convert import convert as vlm_convert

        vlm_convert(hf_path=hf, mlx_path=out, quantize=bool(bits), q_bits=bits or 4, dtype="bfloat16")
    return {"convert_s": time.perf_counter() - t0, "folder_gb": folder_gb(Path(out))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["run", "convert"])
    ap.add_argument("tool", choices=["pg_edge", "mlx_vlm", "mlx_lm"])
    ap.add_argument("folder")
    ap.add_argument("out", nargs="?")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", default="caption en")
    ap.add_argument("--prompt-tokens", type=int, default=259)
    ap.add_argument("--bits", type=int, default=None)
    ap.add_argument("--recipe", default=None)
    ap.add_argument("--attention", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    a = ap.parse_args()
    if a.mode == "convert":
        r = convert(a.tool, a.folder, a.out, a.bits, a.recipe)
    elif a.tool == "pg_edge":
        from pg_edge.benchmark import measure

        r = measure(a.folder, prompt=a.prompt, tokens=a.tokens, attention=a.attention, repeat=a.repeat,
                    warmup=a.warmup)
        r.pop("tokens", None)
    elif a.tool == "mlx_vlm":
        r = run_mlx_vlm(a.folder, a.prompt, a.tokens, a.repeat, a.warmup)
    else:
        r = run_mlx_lm(a.folder, a.tokens, a.prompt_tokens, a.repeat, a.warmup)
    r.update(tool=a.tool, max_rss_gb=max_rss_gb(), peak_memory_gb=r.get("peak_memory_gb", mx.get_peak_memory() / 1e9))
    if a.mode == "run" and "folder_gb" not in r:
        r["folder_gb"] = folder_gb(Path(a.folder))
    print("RESULT " + json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
