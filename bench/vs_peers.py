"""pg_edge against mlx-vlm and mlx-lm, in one run, on the same folders, image and prompt.

    .venv/bin/python bench/vs_peers.py --preset pg2-3b-224 --narrow            # real depth, widths 64
    .venv/bin/python bench/vs_peers.py --preset pg2-3b-224 --cut 1 2           # real widths, 1 and 2
                                                        # layers each, full depth projected
    .venv/bin/python bench/vs_peers.py --preset pg2-3b-224 --cut 1 --convert   # + conversion times
    .venv/bin/python bench/vs_peers.py --preset pg2-3b-224 --convert --precisions ""
                                                        # full size: conversion + quantization only

For each depth: a random HF folder at the preset's shapes (bench/random_folder.py), converted
with `pg-edge convert` (bf16) and quantized with `pg-edge quantize` per precision (bf16, 8 =
all8, 4 = all4, default = decoder4-vision8). On each folder, in separate processes: pg_edge,
mlx-vlm (its own load + stream_generate) on the same folder, and mlx-lm (its own load +
stream_generate) on the same decoder tensors as a plain Gemma/Gemma2 LM, with as many prompt
tokens. `pg_edge_native` is pg_edge with the backend policy off (PG_EDGE_QMM=native): MLX's
quantized kernels as they are, to show what pg_edge/cpu/ buys.

--cut A B projects every time and memory figure to the preset's full depth, linearly from the
two depths (cost = fixed + per-layer x layers; vision figures by vision layers, the rest by
decoder layers); projected figures are marked "proj". --convert also times `pg-edge convert -q`
against mlx-vlm's convert on the same HF folder (time and peak RSS), at bf16 and 4-bit
(--convert-bits; at the first --cut depth only).
Prints the figures and the ratio table (pg_edge / peer) and writes JSON (--json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from random_folder import DECODERS, VISION, make_hf_folder, make_mlx_lm_folder  # noqa: E402

RECIPES = {"bf16": None, "8": "all8", "4": "all4", "default": "decoder4-vision8"}
TOOLS = ["pg_edge", "mlx_vlm", "mlx_lm", "pg_edge_native"]
TIME_KEYS = ("load_s", "vision_s", "ttft_s")
# higher is better for tok/s; for the rest lower is better
FIGURES = ("load_s", "vision_s", "ttft_s", "decode_tps", "peak_memory_gb", "max_rss_gb", "folder_gb")


def worker(args: list[str], env: dict | None = None, log=None) -> dict:
    cmd = [sys.executable, str(HERE / "peer_worker.py"), *args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        print(f"  ! {' '.join(args[:3])}: failed ({' | '.join(tail)})", file=sys.stderr, flush=True)
        return {"error": " | ".join(tail)}
    r = json.loads(lines[-1][7:])
    print(f"  {' '.join(args[:2]):<22} {Path(args[2]).name:<28} {time.perf_counter() - t0:6.1f} s wall",
          file=sys.stderr, flush=True)
    return r


def run_depth(a, work: Path, vision_layers, text_layers, convert: bool = True) -> dict:
    """All tools x precisions at one depth -> {precision: {tool: figures}} (+ conversion)."""
    tag = "narrow" if a.narrow else f"v{vision_layers}t{text_layers}"
    hf = work / f"{a.preset}-{tag}-hf"
    if not (hf / "config.json").exists():
        print(f"building {hf.name}", file=sys.stderr, flush=True)
        make_hf_folder(hf, a.preset, vision_layers, text_layers, narrow=a.narrow)
    out: dict = {"runs": {}}
    if a.convert and convert:
        out["convert"] = {}
        for key in a.convert_bits:
            bits = None if key == "bf16" else int(key)
            rec = ["--bits", str(bits), "--recipe", f"all{bits}"] if bits else []
            out["convert"][key] = {
                "pg_edge": worker(["convert", "pg_edge", str(hf), str(work / f"{tag}-cv-pg-{key}"), *rec]),
                "mlx_vlm": worker(["convert", "mlx_vlm", str(hf), str(work / f"{tag}-cv-vlm-{key}"),
                                   *(["--bits", str(bits)] if bits else [])]),
            }
    bf16 = work / f"{a.preset}-{tag}-bf16"
    if a.precisions and not (bf16 / "config.json").exists():
        worker(["convert", "pg_edge", str(hf), str(bf16)])
    for prec in a.precisions:
        folder = bf16
        if RECIPES[prec]:
            folder = work / f"{a.preset}-{tag}-{prec}"
            if not (folder / "config.json").exists():
                from pg_edge.cli import main

                main(["quantize", str(bf16), "-o", str(folder), "--recipe", RECIPES[prec], "--probes", "0",
                      "--quiet", "--force"])
        lm = work / f"{folder.name}-lm"
        if "mlx_lm" in a.tools and not (lm / "config.json").exists():
            make_mlx_lm_folder(folder, lm)
        runs = {}
        for tool in a.tools:
            args = ["run", tool.replace("_native", ""), str(lm if tool == "mlx_lm" else folder),
                    "--tokens", str(a.tokens), "--repeat", str(a.repeat)] + ([] if a.warmup else ["--no-warmup"])
            if tool == "mlx_lm":
                args += ["--prompt-tokens", str(runs.get("pg_edge", {}).get("prompt_tokens", 259))]
            runs[tool] = worker(args, env={"PG_EDGE_QMM": "native"} if tool == "pg_edge_native" else None)
        out["runs"][prec] = runs
    return out


def project(r1: dict, r2: dict, d1: tuple, d2: tuple, full: tuple) -> dict:
    """Linear extrapolation of every figure from depths d1, d2 to `full` ((vision, text) layers)."""

    def lin(x1, x2, n1, n2, n):
        return x1 + (x2 - x1) / (n2 - n1) * (n - n1)

    out = {}
    for prec, tools in r1["runs"].items():
        out[prec] = {}
        for tool, f1 in tools.items():
            f2 = r2["runs"][prec][tool]
            if "error" in f1 or "error" in f2:
                out[prec][tool] = {"error": f1.get("error") or f2.get("error")}
                continue
            p = {"projected": True}
            for x in ("", "_cpu"):
                vis1, vis2 = f1.get("vision_s" + x) or 0.0, f2.get("vision_s" + x) or 0.0
                p["vision_s" + x] = lin(vis1, vis2, d1[0], d2[0], full[0])
                # TTFT = vision part (vision layers) + prefill part (decoder layers)
                p["ttft_s" + x] = p["vision_s" + x] + lin(f1["ttft_s" + x] - vis1, f2["ttft_s" + x] - vis2,
                                                          d1[1], d2[1], full[1])
                per_tok = lin(1 / f1["decode_tps" + x], 1 / f2["decode_tps" + x], d1[1], d2[1], full[1])
                p["decode_tps" + x] = 1 / per_tok
            for k in ("load_s", "peak_memory_gb", "max_rss_gb", "folder_gb"):
                # weights scale with both towers; the decoder dominates: scale by decoder layers
                p[k] = lin(f1[k], f2[k], d1[1], d2[1], full[1])
            out[prec][tool] = p
    return out


def ratio_table(runs: dict, label: str, x: str = "") -> str:
    """x = "" for wall-clock ratios, "_cpu" for process-CPU-time ratios."""
    clock = "process CPU time" if x else "wall clock"
    lines = [f"ratios pg_edge / peer ({label}; {clock}); speed > 1 = pg_edge faster, memory < 1 = smaller",
             f"{'precision':<9} {'peer':<15} {'TTFT speedup':>12} {'decode x':>9} {'vision x':>9} "
             f"{'load x':>8} {'peak mem':>9} {'max RSS':>8}"]
    for prec, tools in runs.items():
        ours = tools.get("pg_edge", {})
        if "error" in ours or not ours:
            continue
        for peer in ("mlx_vlm", "mlx_lm", "pg_edge_native"):
            th = tools.get(peer)
            if not th or "error" in th:
                continue

            def sp(k):
                k += x
                return f"{th[k] / ours[k]:.2f}x" if th.get(k) and ours.get(k) else "-"

            dec = ours["decode_tps" + x] / th["decode_tps" + x] if th.get("decode_tps" + x) else 0
            mem = ours["peak_memory_gb"] / th["peak_memory_gb"] if th.get("peak_memory_gb") else 0
            rss = ours["max_rss_gb"] / th["max_rss_gb"] if th.get("max_rss_gb") else 0
            ttft = sp("ttft_s") if peer != "mlx_lm" else "(LM only)"
            lines.append(f"{prec:<9} {peer:<15} {ttft:>12} {dec:>8.2f}x {sp('vision_s'):>9} {sp('load_s'):>8} "
                         f"{mem:>8.2f}x {rss:>7.2f}x")
    return "\n".join(lines)


def figures_table(runs: dict, label: str) -> str:
    lines = [f"figures ({label})",
             f"{'precision':<9} {'tool':<15} {'load s':>8} {'vision s':>9} {'TTFT s':>8} {'tok/s':>8} "
             f"{'TTFT cpu':>8} {'tok/cpu-s':>9} {'peak GB':>8} {'RSS GB':>7} {'disk GB':>8}"]
    for prec, tools in runs.items():
        for tool, f in tools.items():
            if "error" in f:
                lines.append(f"{prec:<9} {tool:<15} error: {f['error'][:70]}")
                continue
            mark = " proj" if f.get("projected") else ""
            lines.append(f"{prec:<9} {tool:<15} {f['load_s']:>8.2f} {f.get('vision_s', 0):>9.3f} "
                         f"{f['ttft_s']:>8.3f} {f['decode_tps']:>8.2f} {f['ttft_s_cpu']:>8.3f} "
                         f"{f['decode_tps_cpu']:>9.2f} {f['peak_memory_gb']:>8.3f} "
                         f"{f['max_rss_gb']:>7.3f} {f['folder_gb']:>8.3f}{mark}")
    return "\n".join(lines)


def convert_table(conv: dict) -> str:
    lines = ["conversion + quantization on the same HF folder (pg_edge / mlx-vlm)",
             f"{'bits':<6} {'pg_edge s':>10} {'mlx-vlm s':>10} {'time x':>7} {'pg RSS GB':>10} {'vlm RSS GB':>11} {'RSS x':>6}"]
    for key, t in conv.items():
        p, v = t["pg_edge"], t["mlx_vlm"]
        if "error" in p or "error" in v:
            lines.append(f"{key:<6} error: {(p.get('error') or v.get('error'))[:80]}")
            continue
        lines.append(f"{key:<6} {p['convert_s']:>10.1f} {v['convert_s']:>10.1f} {p['convert_s'] / v['convert_s']:>6.2f}x "
                     f"{p['max_rss_gb']:>10.2f} {v['max_rss_gb']:>11.2f} {p['max_rss_gb'] / v['max_rss_gb']:>5.2f}x")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="pg2-3b-224")
    ap.add_argument("--narrow", action="store_true", help="real depth and vocabulary, widths 64")
    ap.add_argument("--cut", type=int, nargs="+", default=None,
                    help="layer-cut depth(s) (vision and decoder layers each); two depths: project full depth")
    ap.add_argument("--precisions", default="bf16,8,4,default")
    ap.add_argument("--tools", default="pg_edge,mlx_vlm,mlx_lm,pg_edge_native")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per tool; each figure is the best")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="no warm-up call per tool (full size: it would cost a whole prefill)")
    ap.add_argument("--convert", action="store_true", help="also time conversion + quantization")
    ap.add_argument("--convert-bits", default="bf16,4", help="what --convert times: bf16 and/or bit widths")
    ap.add_argument("--work", default="/tmp/pg_edge_bench")
    ap.add_argument("--json", default=None, help="write every figure here")
    a = ap.parse_args()
    a.precisions = [p for p in a.precisions.split(",") if p]  # "" with --convert: conversion only
    a.convert_bits = a.convert_bits.split(",")
    a.tools = a.tools.split(",")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    import mlx.core as mx

    machine = f"{platform.machine()} {os.cpu_count()} cpus, MLX {mx.__version__} on {mx.default_device()}"
    name, _ = a.preset.rsplit("-", 1)
    full = (VISION["num_hidden_layers"], DECODERS[name][2])
    result = {"preset": a.preset, "narrow": a.narrow, "machine": machine, "tokens": a.tokens,
              "command": " ".join(sys.argv), "depths": {}}
    print(f"machine: {machine}")
    if a.narrow or not a.cut:
        d = run_depth(a, work, None, None)
        result["depths"]["narrow" if a.narrow else "full"] = d
        label = f"{a.preset} narrow-deep (widths 64, full depth)" if a.narrow else f"{a.preset} full size"
        print(figures_table(d["runs"], label))
        print(ratio_table(d["runs"], label))
        print(ratio_table(d["runs"], label, "_cpu"))
        if "convert" in d:
            print(convert_table(d["convert"]))
    else:
        for n in a.cut:
            d = run_depth(a, work, n, n, convert=n == a.cut[0])  # conversion: at the first depth
            result["depths"][f"cut{n}"] = d
            if a.json:  # after each depth: a long run stopped later keeps what it measured
                Path(a.json).write_text(json.dumps(result, indent=2))
            label = f"{a.preset} real widths, {n} vision + {n} decoder layer(s)"
            print(figures_table(d["runs"], label))
            print(ratio_table(d["runs"], label))
            print(ratio_table(d["runs"], label, "_cpu"))
            if "convert" in d:
                print(convert_table(d["convert"]))
        if len(a.cut) == 2:
            n1, n2 = a.cut
            proj = project(result["depths"][f"cut{n1}"], result["depths"][f"cut{n2}"], (n1, n1), (n2, n2), full)
            result["projected_full_depth"] = proj
            label = f"{a.preset} full depth {full}, PROJECTED from cuts {n1} and {n2}"
            print(figures_table(proj, label))
            print(ratio_table(proj, label))
            print(ratio_table(proj, label, "_cpu"))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
