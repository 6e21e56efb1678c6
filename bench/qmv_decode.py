"""4-bit and bf16 decode products against this machine's memory-bandwidth roofline (issue 21).

    python bench/qmv_decode.py [--repeat 5] [--threads 2] [--layers 26] [--bf16-layers 8]
                               [--read-mb 2048] [--formats 4bit,bf16]

In one run, interleaved round by round (the figures move when other work shares the cores):
  - read bandwidth: bench/bandwidth.py read_gbs over a --read-mb MiB array (default 2 GB: larger than the
    last-level cache, 480 MB on this project's machine), split over --threads threads (numpy
    releases the GIL in its reductions), GB/s;
  - PaliGemma 2 3B's 4-bit products (group 64, bf16 scales as pg-edge quantize stores them),
    one token (x [1, K] float32): the MLP's 2304x9216 (down) and 9216x2304 (gate/up) and the
    tied LM head 257216x2304, each by pg_edge's compiled matvec (pg_edge.cpu.qmv), by MLX's
    CPU kernel on one stream (mx.quantized_matmul, float32 x and scales: its fast kernel) and by
    pg_edge's CPU product without the compiled kernel (MLX's kernel split over the streams);
  - a decode step's products: each Gemma2 layer's seven (q 2048, k 1024, v 1024, o 2304x2048,
    gate, up, down) for 26 layers, over --layers distinct copies (default 26: all distinct,
    1.47 GB with the head, more than the cache holds), plus the LM head. Attention, norms and sampling are not in it: a decode step's floor.
  - the same products with bfloat16 weights (a bf16 model's decoder; x [1, K] bfloat16, as its
    activations are): pg_edge's compiled float matvec (fmv.cpp, through pg_edge's CPU product),
    MLX's bf16 matvec on one stream (x @ w.T) and pg_edge's CPU product without the compiled
    kernel (MLX's matvec split over the streams); and a bf16 decode step's products over
    --bf16-layers distinct layer copies (default 8: 1.24 GB + the 1.19 GB head, so each copy
    comes back from memory, not the cache; 26 would hold 5.2 GB).
Effective GB/s = bytes of the weights (packed weights + scales + biases when quantized) / time;
the fraction is of the read bandwidth measured in the same round. Each figure: best and median
of the rounds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pg_edge  # noqa: E402,F401  (first: it loads the fast BLAS before MLX, as for a user)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pg_edge.cpu import products, streams  # noqa: E402
from pg_edge.cpu import qmv  # noqa: E402
from bandwidth import read_gbs  # noqa: E402  (bench/bandwidth.py: the same read in every bench)

HIDDEN, LAYERS = 2304, 26
LAYER_SHAPES = {"q": (2048, 2304), "k": (1024, 2304), "v": (1024, 2304), "o": (2304, 2048),
                "gate": (9216, 2304), "up": (9216, 2304), "down": (2304, 9216)}
PRODUCTS = {"down 2304x9216": (2304, 9216), "gate/up 9216x2304": (9216, 2304),
            "lm head 257216x2304": (257216, 2304)}


def layer(n: int, k: int, seed: int) -> nn.QuantizedLinear:
    q = nn.QuantizedLinear(k, n, bias=False, group_size=64, bits=4)
    w = mx.random.normal((n, k), key=mx.random.key(seed)).astype(mx.bfloat16) * 0.02
    wq, s, b = mx.quantize(w, group_size=64, bits=4)
    q.update({"weight": wq, "scales": s, "biases": b})
    q.eval()
    q.__class__ = products.CpuQuantizedLinear
    mx.eval(q.parameters())
    return q


def bf16_weight(n: int, k: int, seed: int) -> mx.array:
    w = (mx.random.normal((n, k), key=mx.random.key(seed)) * 0.02).astype(mx.bfloat16)
    mx.eval(w)
    return w


def nbytes(q) -> int:
    if isinstance(q, mx.array):
        return q.nbytes
    return sum(q[k].nbytes for k in ("weight", "scales", "biases"))


def bf16_product(w, x):
    """pg_edge's CPU product of a bf16 Linear at decode (inference: the compiled kernel when taken)."""
    return products.cpu_float_product(w, x, lean_ok=True)


def mlx_one_stream(q, x):
    s, b = products.float32_scales(q)
    return mx.quantized_matmul(x, q["weight"], s, b, transpose=True, group_size=64, bits=4)


def timed(fn, n: int) -> float:
    mx.eval(fn())
    t = time.perf_counter()
    for _ in range(n):
        mx.eval(fn())
    return (time.perf_counter() - t) / n


def with_qmv(on: bool, fn):
    """fn() with the compiled kernel taken (on) or not (off) by pg_edge's CPU product."""
    keep = qmv.MAX_ROWS
    qmv.MAX_ROWS = keep if on else 0
    try:
        return fn()
    finally:
        qmv.MAX_ROWS = keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=2, help="threads of the bandwidth read")
    ap.add_argument("--layers", type=int, default=LAYERS, help="distinct layer copies in the step")
    ap.add_argument("--bf16-layers", type=int, default=8, help="distinct bf16 layer copies in the bf16 step")
    ap.add_argument("--read-mb", type=int, default=2048, help="size of the bandwidth read")
    ap.add_argument("--formats", default="4bit,bf16", help="which products: 4bit, bf16 or both")
    args = ap.parse_args()
    print(f"decode matvec: {qmv.kernel()}; MLX {mx.__version__}; {streams.stream_count()} CPU streams")
    if qmv.module() is None:
        sys.exit("build it first: python -m pg_edge.cpu.qmv build")
    formats = set(args.formats.split(","))
    # name -> (bytes read, {label: fn}) for single products; steps: name -> (bytes, {label: (on, fn)})
    singles: dict[str, tuple[int, dict]] = {}
    steps: dict[str, tuple[int, dict]] = {}
    xs = {k: mx.random.normal((1, k)) for k in (2048, 2304, 9216)}
    xb = {k: v.astype(mx.bfloat16) for k, v in xs.items()}
    mx.eval(xs, xb)
    if "4bit" in formats:
        qs = {name: layer(n, k, i) for i, (name, (n, k)) in enumerate(PRODUCTS.items())}
        for name, q in qs.items():
            x = xs[q["scales"].shape[1] * 64]
            singles[name] = (nbytes(q), {"pg_edge qmv": lambda q=q, x=x: with_qmv(True, lambda: q(x)),
                                         "mlx, 1 stream": lambda q=q, x=x: mlx_one_stream(q, x),
                                         "pg_edge w/o qmv": lambda q=q, x=x: with_qmv(False, lambda: q(x))})
        stack = [{name: layer(n, k, 100 + 10 * j + i) for i, (name, (n, k)) in enumerate(LAYER_SHAPES.items())}
                 for j in range(min(args.layers, LAYERS))]
        head = qs["lm head 257216x2304"]

        def step():
            """One 4-bit decode step's products: LAYERS layers (cycling the copies) + head."""
            for i in range(LAYERS):
                mx.eval([q(xs[q["scales"].shape[1] * 64]) for q in stack[i % len(stack)].values()])
            mx.eval(head(xs[HIDDEN]))

        steps["decode step products"] = (LAYERS * sum(nbytes(q) for q in stack[0].values()) + nbytes(head),
                                         {"pg_edge qmv": (True, step), "pg_edge w/o qmv": (False, step)})
    if "bf16" in formats:
        ws = {name: bf16_weight(n, k, 50 + i) for i, (name, (n, k)) in enumerate(PRODUCTS.items())}
        for name, w in ws.items():
            x = xb[w.shape[1]]
            singles[f"bf16 {name}"] = (w.nbytes, {
                "pg_edge fmv": lambda w=w, x=x: with_qmv(True, lambda: bf16_product(w, x)),
                "mlx, 1 stream": lambda w=w, x=x: x @ w.T,
                "pg_edge w/o fmv": lambda w=w, x=x: with_qmv(False, lambda: bf16_product(w, x))})
        bstack = [{name: bf16_weight(n, k, 500 + 10 * j + i) for i, (name, (n, k)) in enumerate(LAYER_SHAPES.items())}
                  for j in range(min(args.bf16_layers, LAYERS))]
        bhead = ws["lm head 257216x2304"]

        def bstep():
            """One bf16 decode step's products: LAYERS layers (cycling the copies) + head."""
            for i in range(LAYERS):
                mx.eval([bf16_product(w, xb[w.shape[1]]) for w in bstack[i % len(bstack)].values()])
            mx.eval(bf16_product(bhead, xb[HIDDEN]))

        steps["bf16 decode step products"] = (LAYERS * sum(w.nbytes for w in bstack[0].values()) + bhead.nbytes,
                                              {"pg_edge fmv": (True, bstep), "pg_edge w/o fmv": (False, bstep)})

    rows: dict[str, list[tuple[float, float]]] = {}  # name -> [(seconds, bandwidth GB/s)]
    sizes: dict[str, int] = {}
    for r in range(args.repeat):
        bw = read_gbs(mib=args.read_mb, threads=args.threads, repeat=3)
        rows.setdefault("read bandwidth (numpy)", []).append((0.0, bw))
        for name, (size, fns) in singles.items():
            for label, fn in fns.items():
                sizes[f"{name}: {label}"] = size
                rows.setdefault(f"{name}: {label}", []).append((timed(fn, 2 if "head" in name else 20), bw))
        for name, (size, fns) in steps.items():
            for label, (on, fn) in fns.items():
                with_qmv(on, fn)  # warm
                t = time.perf_counter()
                with_qmv(on, fn)
                sizes[f"{name}: {label}"] = size
                rows.setdefault(f"{name}: {label}", []).append((time.perf_counter() - t, bw))
        print(f"round {r + 1}/{args.repeat} done (read {bw:.1f} GB/s)", file=sys.stderr)

    print(f"\n{'':44} {'ms best':>9} {'ms median':>9} {'GB/s best':>9} {'of roofline':>11} {'median':>7}")
    for name, runs in rows.items():
        if name.startswith("read"):
            bws = [b for _, b in runs]
            print(f"{name:44} {'':>9} {'':>9} {max(bws):9.1f}   (rounds: {' '.join(f'{b:.1f}' for b in bws)})")
            continue
        secs = [s for s, _ in runs]
        gbs = [sizes[name] / s / 1e9 for s in secs]
        frac = [g / b for g, (_, b) in zip(gbs, runs)]
        print(f"{name:44} {1e3 * min(secs):9.2f} {1e3 * statistics.median(secs):9.2f} {max(gbs):9.2f} "
              f"{max(frac):10.0%} {statistics.median(frac):7.0%}")
    best_bw = max(b for _, b in rows["read bandwidth (numpy)"])
    for name, (size, _) in steps.items():
        print(f"\n{name} read {size / 1e9:.3f} GB ({LAYERS} layers + LM head); "
              f"roofline at the best read bandwidth: {best_bw * 1e9 / size:.1f} steps/s", end="")
    print()


if __name__ == "__main__":
    main()
