"""`measure(folder)`: how fast one converted folder runs here — what `pg-edge bench` prints and
what bench/vs_peers.py compares against mlx-vlm and mlx-lm.

Figures (one image, one prompt, a warm-up call first, greedy decoding that ignores eos so every
run decodes the same number of tokens):
    load_s          pg_edge.load + evaluating every parameter (MLX loads lazily otherwise)
    vision_s        SigLIP + connector for the image (features not cached)
    prefill is included in ttft_s; with repeat > 1 each figure is the best run; every time
    figure also comes as process CPU time (vision_s_cpu, ttft_s_cpu, decode_tps_cpu)
    ttft_s          image encode + prompt prefill until the first token is known
    decode_tps      tokens per second over `tokens` decode steps after the first token
    peak_memory_gb  MLX's peak allocation counter over load + one generation
    max_rss_gb      the process's peak resident memory (so includes Python and the tokenizer)
    folder_gb       bytes on disk of the folder
    blas            the BLAS under MLX's CPU float32 products (pg_edge/blas.py) and
    matmul_gflops   MLX's float32 1024 x 1024 matmul speed here with it
    pages           how much of the weights load put on 2 MB pages (pg_edge/cpu/pages.py)
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from .cpu import pages, qmv
from .errors import PgEdgeError


def max_rss_gb() -> float:
    """Peak resident set size of this process. Linux: VmHWM of /proc/self/status, the high-water
    mark of this program's own memory (ru_maxrss also counts the parent's RSS at fork, so a
    child of a big process would report at least that); elsewhere ru_maxrss (bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1e9 if sys.platform == "darwin" else r * 1024 / 1e9


def folder_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file()) / 1e9


def bench_image(size: int = 224):
    """A fixed, deterministic RGB test image (the processor resizes it to the model's size)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def decode_tokens(pg, image, prompt: str, tokens: int, sampler=None) -> dict:
    """One timed generation with pg_edge's generator: vision, TTFT, decode tokens/s (greedy, or
    by `sampler`, e.g. `pg_edge.generate.Sampling(temperature=0.7).sampler()`)."""
    from .generate import generate_step

    inp = pg.prepare([image], [prompt])
    ids = mx.array(inp.input_ids)
    pg._vision_cache.clear()  # time the encoder, not the cache
    clock = Clock()
    feats = pg.image_features(inp.pixel_values)
    vision = clock.lap()
    steps = generate_step(pg.model, ids, feats, max_tokens=tokens + 1, sampler=sampler)
    first, _ = next(steps)
    mx.eval(first)
    prefill = clock.lap()
    out = [int(first[0])]
    for tok, _ in steps:
        out.append(int(tok[0]))
    decode = clock.lap()
    return {**timings(vision, prefill, decode, tokens), "prompt_tokens": int(ids.shape[1]), "tokens": out}


def matmul_gflops(n: int = 1024, repeat: int = 5) -> float:
    """MLX's float32 n x n matmul on the default device, GFLOP/s (best of `repeat`): what the
    BLAS under it delivers on all cores (netlib's reference BLAS ~2, OpenBLAS ~35-70 on 2 x86
    cores)."""
    from .blas import all_cores

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    times = []
    with all_cores():  # one product on one stream: OpenBLAS's own threads use the cores
        mx.eval(a @ b)
        for _ in range(repeat):
            t = time.perf_counter()
            mx.eval(a @ b)
            times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


class Clock:
    """Wall and process-CPU time since the last lap. On a shared machine the CPU time (all of
    this process's threads) is the steadier figure: other processes' load barely moves it."""

    def __init__(self):
        self.t, self.c = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        out = (t - self.t, c - self.c)
        self.t, self.c = t, c
        return out


def timings(vision, prefill, decode, tokens: int) -> dict:
    """(wall, cpu) laps -> the figures: vision_s, ttft_s, decode_tps and their *_cpu twins."""
    out = {"decode_tokens": tokens}
    for i, suffix in ((0, ""), (1, "_cpu")):
        out["vision_s" + suffix] = vision[i]
        out["ttft_s" + suffix] = vision[i] + prefill[i]
        out["decode_tps" + suffix] = tokens / decode[i] if decode[i] else 0.0
    return out


def best(runs: list[dict]) -> dict:
    """Per figure, the best of several runs (least disturbed by other processes)."""
    out = dict(runs[-1])
    for k in runs[0]:
        if k.endswith(("_s", "_s_cpu")):
            out[k] = min(r[k] for r in runs)
        elif k.startswith("decode_tps"):
            out[k] = max(r[k] for r in runs)
    return out


def measure(folder, *, prompt: str = "caption en", tokens: int = 32, attention: str | None = None,
            repeat: int = 1, warmup: bool = True) -> dict:
    """Load `folder` and time `repeat` generations after a warm-up (each figure: the best run);
    returns the figures above, each also as process CPU time (`*_cpu`). warmup=False: no
    warm-up call (a full-size model on a slow backend, where it would cost a whole prefill;
    the first call then includes one-time kernel setup)."""
    import pg_edge
    from .blas import describe

    if tokens < 1:
        raise PgEdgeError(f"tokens must be >= 1, got {tokens}")
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    kwargs = {"attention": attention} if attention else {}
    pg = pg_edge.load(folder, **kwargs)
    mx.eval(pg.model.parameters())
    load_s = time.perf_counter() - t0
    image = bench_image(pg.config.vision.image_size)
    if warmup:
        decode_tokens(pg, image, prompt, 2)  # first-call allocations and kernel setup
    run = best([decode_tokens(pg, image, prompt, tokens) for _ in range(max(1, repeat))])
    return {
        "tool": "pg_edge", "folder": str(pg.folder), "load_s": load_s, **run,
        "peak_memory_gb": mx.get_peak_memory() / 1e9, "max_rss_gb": max_rss_gb(),
        "folder_gb": folder_gb(pg.folder), "device": str(mx.default_device()),
        # key kept from before the bf16/fp16 matvec joined the extension: both run the same kernel set
        "quantized_matvec": qmv.kernel() if mx.default_device().type == mx.cpu else "mlx",
        "prefill_products": qmv.prefill_kernel() if mx.default_device().type == mx.cpu else "mlx",
        "blas": describe(), "matmul_gflops": matmul_gflops(), "pages": pages.describe(),
    }


def to_text(r: dict) -> str:
    """The table `pg-edge bench` prints."""
    rows = [
        ("load", f"{r['load_s']:.2f} s"),
        ("vision encode", f"{r['vision_s']:.3f} s"),
        (f"time to first token ({r['prompt_tokens']} prompt tokens)", f"{r['ttft_s']:.3f} s"),
        (f"decode ({r['decode_tokens']} tokens)", f"{r['decode_tps']:.2f} tok/s"),
        ("peak memory (MLX)", f"{r['peak_memory_gb']:.3f} GB"),
        ("peak memory (process RSS)", f"{r['max_rss_gb']:.3f} GB"),
        ("folder size", f"{r['folder_gb']:.3f} GB"),
        ("float32 matmul 1024^2 (MLX)", f"{r['matmul_gflops']:.1f} GFLOP/s"),
    ]
    w = max(len(k) for k, _ in rows)
    head = f"pg_edge on {r['device']}: {r['folder']}"
    if "quantized_matvec" in r:
        head += f"\n  decode matvec (quantized, bf16/fp16): {r['quantized_matvec']}"
    if "prefill_products" in r:
        head += f"\n  prefill products (quantized, bf16/fp16): {r['prefill_products']}"
    tail = [f"  BLAS: {r['blas']}"] + ([f"  weights' pages: {r['pages']}"] if "pages" in r else [])
    return "\n".join([head] + [f"  {k:<{w}}  {v:>14}" for k, v in rows] + tail)
