"""Batched serving with adapters (issue 22): through `pg-edge serve`'s HTTP server, in one run.

    python bench/serve_batch.py                          # the demo model
    python bench/serve_batch.py --rounds 9               # steadier medians on a shared machine
    python bench/serve_batch.py --cut pg2-3b-224         # + a real-width layer cut (random weights)
    python bench/serve_batch.py --skip-demo --cut pg2-3b-224 --cut-max-tokens 4 --cut-rounds 1

For each model: two random LoRA adapters on the one loaded base; then, through the server
(in this process, max_batch 8), requests that mix the base and the adapters:

- `ratio`: N requests sent at once against the same N sent one after another; the two are
  interleaved round by round (the machine may be shared: each round's pair sees the same load)
  and the medians compared;
- throughput (completion tokens per second) with 1, 2, 4 and 8 requests at once, interleaved;
- memory (MLX active memory): the base alone, the base + N adapters, N separate models each
  with its adapter applied (measured for one, times N); and what one more batch row costs: the
  peak of a batch of 8 against a batch of 1, per extra row, beside its KV cache by arithmetic.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pg_edge  # noqa: E402  (first: it loads the fast BLAS before MLX, pg_edge/blas.py)
import mlx.core as mx  # noqa: E402

from fixtures.adapters import make_random_adapter  # noqa: E402
from pg_edge.server import make_server  # noqa: E402

DEMO_IMAGES = [ROOT / f"pg_edge/demo/samples/shapes_{i}.png" for i in (1, 2, 3)]
PHOTO = ROOT / "pg_edge/assets/astronaut.jpg"
PROMPTS = ["caption en", "detect circle ; square", "answer en what is in the image?", "ocr"]


def data_url(path: Path, size: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(path).convert("RGB").resize((size, size)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def post(port: int, body: dict) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"{resp.status}: {answer}")
    return answer


def bodies(n: int, models: list[str], urls: list[str], max_tokens: int) -> list[dict]:
    return [{"model": models[k % len(models)], "max_tokens": max_tokens,
             "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPTS[k % len(PROMPTS)]},
                                                       {"type": "image_url", "image_url": {"url": urls[k % len(urls)]}}]}]}
            for k in range(n)]


def one_after_another(port, reqs) -> tuple[float, int]:
    t0 = time.perf_counter()
    tokens = sum(post(port, b)["usage"]["completion_tokens"] for b in reqs)
    return time.perf_counter() - t0, tokens


def at_once(port, reqs) -> tuple[float, int]:
    out = [None] * len(reqs)
    threads = [threading.Thread(target=lambda k=k: out.__setitem__(k, post(port, reqs[k]))) for k in range(len(reqs))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, sum(o["usage"]["completion_tokens"] for o in out)


def load() -> str:
    """The 1, 5 and 15 minute load averages (the benchmark's ratios are within one run, but a
    loaded machine moves them)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def kv_bytes_per_token(pg) -> int:
    t = pg.config.text
    size = pg.model.embed_text(mx.array([[0]])).dtype.size  # the decoder's activations (and keys)
    return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * size


def bench_model(label: str, folder, image_paths, max_tokens: int, n: int, rounds: int, rank: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="pg_edge_serve_batch_"))
    adapters = {name: make_random_adapter(folder, tmp / name, seed=k + 1, rank=rank)
                for k, name in enumerate(("a", "b"))}
    mx.clear_cache()
    m0 = mx.get_active_memory()
    pg = pg_edge.load(folder)
    base = mx.get_active_memory() - m0
    for name, where in adapters.items():
        pg.add_adapter(name, where)
    with_adapters = mx.get_active_memory() - m0
    one = pg_edge.load(folder, adapters=adapters["a"])  # a separate model with its adapter applied
    separate = mx.get_active_memory() - m0 - with_adapters
    one.close()
    del one
    mx.clear_cache()

    size = pg.config.vision.image_size
    urls = [data_url(p, size) for p in image_paths]
    srv = make_server(pg, "127.0.0.1", 0, model_id="base", max_tokens=max_tokens, queue_size=16, max_batch=8)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    models = ["base", "a", "b"]
    reqs = bodies(n, models, urls, max_tokens)
    at_once(port, reqs[:2])  # warm up: features cached, kernels built
    seq, conc, tput = [], [], {k: [] for k in (1, 2, 4, 8)}
    peaks = {}
    for r in range(rounds):
        seq.append(one_after_another(port, reqs))
        conc.append(at_once(port, reqs))
        for k in (1, 2, 4, 8):
            wall, tokens = at_once(port, bodies(k, models, urls, max_tokens))
            tput[k].append(tokens / wall)
            peaks[k] = max(peaks.get(k, 0), mx.get_peak_memory())
    srv.shutdown()
    srv.server_close()
    pg.close()
    seq_s = statistics.median(s for s, _ in seq)
    conc_s = statistics.median(s for s, _ in conc)
    prompt_tokens = pg.config.num_image_tokens + 8
    return {
        "model": label, "requests": n, "max_tokens": max_tokens, "rounds": rounds,
        "tokens": [t for _, t in seq][0],
        "one_after_another_s": round(seq_s, 2), "at_once_s": round(conc_s, 2), "ratio": round(conc_s / seq_s, 3),
        "tokens_per_s": {k: round(statistics.median(v), 1) for k, v in tput.items()},
        "memory_mb": {"base": round(base / 2**20, 1), "base_plus_2_adapters": round(with_adapters / 2**20, 1),
                      "2_separate_models": round(2 * separate / 2**20, 1)},
        "row_mb": {"measured": round((peaks[8] - peaks[1]) / 7 / 2**20, 2),
                   "kv_cache": round(kv_bytes_per_token(pg) * (prompt_tokens + max_tokens) / 2**20, 2)},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cut", default=None, help="also a real-width layer cut of this preset (e.g. pg2-3b-224)")
    p.add_argument("--cut-layers", type=int, default=2, help="text layers of the cut (default 2; vision 1)")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--cut-max-tokens", type=int, default=None,
                   help="max_tokens for the cut (default: --max-tokens; its 257216-row bf16 LM head makes each "
                        "decode step slow on a CPU)")
    p.add_argument("--cut-rounds", type=int, default=None, help="rounds for the cut (default: --rounds)")
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    header = ("| model | N at once / one after another | tok/s @1 | @2 | @4 | @8 | base MB | base + 2 adapters MB "
              "| 2 separate models MB | a batch row MB (measured / KV by arithmetic) |\n|---|---|---|---|---|---|---|---|---|---|")
    if not args.json:
        print(f"load average at start: {load()}", flush=True)
        print(header, flush=True)

    def report(r: dict) -> None:  # each model's row as soon as it is measured
        r["load_average"] = load()  # the machine may be shared: the load when the row finished
        if args.json:
            print(json.dumps(r), flush=True)
            return
        t, m = r["tokens_per_s"], r["memory_mb"]
        print(f"| {r['model']} | {r['at_once_s']} s / {r['one_after_another_s']} s = **{r['ratio']}** "
              f"({r['requests']} requests, {r['tokens']} tokens) | {t[1]} | {t[2]} | {t[4]} | {t[8]} | {m['base']} "
              f"| {m['base_plus_2_adapters']} | {m['2_separate_models']} | {r['row_mb']['measured']} / "
              f"{r['row_mb']['kv_cache']} |", flush=True)
        print(f"load average after {r['model']}: {r['load_average']}", flush=True)

    if not args.skip_demo:
        report(bench_model("demo", "demo", DEMO_IMAGES, args.max_tokens, args.requests, args.rounds, args.rank))
    if args.cut:
        from bench.random_folder import make_hf_folder

        folder = make_hf_folder(Path(tempfile.mkdtemp(prefix="pg_edge_cut_")) / args.cut, args.cut,
                                vision_layers=1, text_layers=args.cut_layers)
        report(bench_model(f"{args.cut} cut (1 vision, {args.cut_layers} text layers)", folder,
                           [PHOTO, *DEMO_IMAGES], args.cut_max_tokens or args.max_tokens, args.requests,
                           args.cut_rounds or args.rounds, args.rank))
    return 0


if __name__ == "__main__":
    sys.exit(main())
