"""transformers (torch CPU, float32) as a peer: one measurement in its own process.

    python bench/hf_worker.py HF_FOLDER --tokens 32 --repeat 2

Loads `PaliGemmaForConditionalGeneration` from the HF folder in float32 (what runs on a CPU
without bf16 kernels: the HF checkpoints are bf16 on disk and transformers upcasts them), the
processor from the same folder, and times `model.generate` the way bench/peer_worker.py times
the MLX tools: a warm-up call (none with --no-warmup), then timed calls, greedy, `--tokens` decode
steps after the first token (min_new_tokens: eos never stops it). The first token's time is
taken by a logits processor, which `generate` calls once per step right after the step's
forward pass: time to the first call = vision + prefill (TTFT); the rest = decode. Vision alone:
`model.get_image_features` on the processed pixels. Never imports MLX, so its max RSS is
transformers' and torch's own. Prints one line `RESULT {json}` (times in s, memory in GB).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


class Clock:
    def __init__(self):
        self.t, self.c = time.perf_counter(), time.process_time()

    def lap(self):
        t, c = time.perf_counter(), time.process_time()
        out = (t - self.t, c - self.c)
        self.t, self.c = t, c
        return out


def max_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return 0.0


def folder_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file()) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", default="caption en")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    a = ap.parse_args()

    import torch
    from PIL import Image
    from transformers import LogitsProcessor, LogitsProcessorList, PaliGemmaForConditionalGeneration, \
        PaliGemmaProcessor

    t0 = time.perf_counter()
    model = PaliGemmaForConditionalGeneration.from_pretrained(a.folder, dtype=torch.float32).eval()
    processor = PaliGemmaProcessor.from_pretrained(a.folder)
    load_s = time.perf_counter() - t0
    size = model.config.vision_config.image_size
    rng = np.random.default_rng(0)  # pg_edge.benchmark.bench_image's image
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))

    class FirstToken(LogitsProcessor):
        def __init__(self, clock):
            self.clock, self.first = clock, None

        def __call__(self, input_ids, scores):
            if self.first is None:
                self.first = self.clock.lap()
            return scores

    @torch.inference_mode()
    def once(n):
        clock = Clock()
        inputs = processor(text=a.prompt, images=image, return_tensors="pt")
        model.get_image_features(pixel_values=inputs["pixel_values"])
        vision = clock.lap()
        clock = Clock()
        mark = FirstToken(clock)
        inputs = processor(text=a.prompt, images=image, return_tensors="pt")
        model.generate(**inputs, max_new_tokens=n + 1, min_new_tokens=n + 1, do_sample=False,
                       logits_processor=LogitsProcessorList([mark]), pad_token_id=0)
        decode = clock.lap()
        out = {"decode_tokens": n, "prompt_tokens": int(inputs["input_ids"].shape[1])}
        for i, x in ((0, ""), (1, "_cpu")):
            out["vision_s" + x] = vision[i]
            out["ttft_s" + x] = mark.first[i]
            out["decode_tps" + x] = n / decode[i]
        return out

    if a.warmup:
        once(2)
    runs = [once(a.tokens) for _ in range(a.repeat)]
    r = dict(runs[-1])
    for k in runs[0]:
        if k.endswith(("_s", "_s_cpu")):
            r[k] = min(x[k] for x in runs)
        elif k.startswith("decode_tps"):
            r[k] = max(x[k] for x in runs)
    r.update(tool="transformers", load_s=load_s, max_rss_gb=max_rss_gb(), peak_memory_gb=max_rss_gb(),
             folder_gb=folder_gb(Path(a.folder)), torch=torch.__version__, threads=torch.get_num_threads())
    print("RESULT " + json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
