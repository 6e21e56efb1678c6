"""`make demo-model`: every stage of the demo model, each a command printed with its time.

    python -m apps.demo_model.build [--work DIR] [--from STAGE] [--only STAGE]

Stages (outputs under --work, default build/demo_model; the last stages write the repository):
    tokenizer   SentencePiece model with the task words, <locNNNN>, <segNNN>  (apps/demo_model/tokenizer.py)
    vqvae       the mask VQ-VAE on the shapes' masks -> vae-oid.npz             (apps/demo_model/vqvae.py)
    pretrain    caption / detect / segment from random init, torch, HF layout  (apps/demo_model/pretrain.py)
    convert     pg-edge convert (float32)                                      (as for Google's weights)
    data        JSONL for task transfer: counting + replay                     (apps/demo_model/finetune_data.py)
    finetune    pg-edge finetune: counting is learned here                     (pg_edge's own trainer)
    export      the fine-tuned float model in the official HF layout -> hf_finetuned
    table       the segment codes that model writes, per (kind, box side)      (apps/demo_model/seg_table.py)
    retask      prompt following: torch, every detect/segment prompt form with empty answers for
                absent kinds, caption and count replayed; three phases each on a model deepened
                by two layers a stack, to 6 + 6, 8 + 8 then 10 + 10 (apps/demo_model/grow.py), then
                two more at 10 + 10 on fresh images (the last with a larger segment share)
                -> apps/demo_model/hf (kept in the repo)
    ship        pg-edge convert apps/demo_model/hf, pg-edge quantize -> pg_edge/demo/model,
                pg-edge convert-vae -> pg_edge/demo/model/vae.safetensors, sample images
Settings for convert / finetune / quantize: apps/demo_model/recipe.json (the reproduction test reads
the same file). Dev tool: needs torch and transformers (the test extras).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "apps" / "demo_model"
HF_SOURCE = HERE / "hf"  # the float model in the official HF layout, kept in the repository
VAE_SOURCE = HERE / "vae-oid.npz"  # the VQ-VAE decoder + codebook in big_vision's layout
SHIPPED = ROOT / "pg_edge" / "demo" / "model"
# The shipped model's pretraining, as it was run: eight phases, each continuing the previous
# (the later ones fix what the earlier measured wrong; stopped phases keep their schedule).
# Phase 1 (per-token loss, hard <loc> targets) lost the colours (the long segment rows
# outweighed the captions); phase 2: per-example mean, one-shape images mixed in (stopped at
# 500); phase 3: soft <loc> targets, blurred <loc> embeddings (stopped at 1200: boxes still
# ~20 px off); phase 4: sinusoidal position codes added to SigLIP's positions and the <loc>
# embeddings, a higher learning rate, more detection; phase 5: 3000 more steps on fresh images,
# detection weighted up again (the boxes were still the weakest task); phase 6: 2400 more at a
# lower peak learning rate (two threads once the machine was free: 0.19 s a step); phase 7:
# 5000 more (1106 s), captions weighted up; phase 8: 4000 more at a lower rate, segmentation
# weighted up (one thread pinned to one core, 0.29 s a step, the other core fine-tuning).
PRETRAIN = (
    ["--steps", 1100, "--batch-size", 32, "--lr", 2e-3, "--warmup", 80, "--loss-norm", "token", "--hard-loc",
     "--smooth-loc", 0, "--single", 0, "--mix", "caption=0.3,detect=0.4,segment=0.3"],
    ["--steps", 2500, "--stop-at", 500, "--batch-size", 24, "--lr", 1e-3, "--warmup", 100, "--hard-loc",
     "--smooth-loc", 0, "--single", 0.5, "--start-index", 100_000],
    ["--steps", 2200, "--stop-at", 1200, "--batch-size", 24, "--lr", 1e-3, "--warmup", 50, "--smooth-loc", 8,
     "--single", 0.3, "--start-index", 200_000],
    ["--steps", 1400, "--batch-size", 24, "--lr", 2e-3, "--warmup", 50, "--smooth-loc", 0, "--position-priors", 0.5,
     "--single", 0.2, "--mix", "caption=0.3,detect=0.4,segment=0.3", "--start-index", 300_000],
    ["--steps", 3000, "--batch-size", 24, "--lr", 1e-3, "--warmup", 50, "--smooth-loc", 0, "--single", 0.1,
     "--mix", "caption=0.25,detect=0.45,segment=0.3", "--start-index", 400_000, "--save-every", 250],
    ["--steps", 2400, "--batch-size", 24, "--lr", 7e-4, "--warmup", 50, "--smooth-loc", 0, "--single", 0.1,
     "--mix", "caption=0.3,detect=0.4,segment=0.3", "--start-index", 500_000, "--save-every", 250,
     "--threads", 2],
    ["--steps", 5000, "--batch-size", 24, "--lr", 5e-4, "--warmup", 50, "--smooth-loc", 0, "--single", 0.1,
     "--mix", "caption=0.35,detect=0.35,segment=0.3", "--start-index", 600_000, "--save-every", 500,
     "--threads", 2],
    ["--steps", 4000, "--batch-size", 24, "--lr", 3e-4, "--warmup", 50, "--smooth-loc", 0, "--single", 0.1,
     "--mix", "caption=0.3,detect=0.3,segment=0.4", "--start-index", 700_000, "--save-every", 500,
     "--threads", 1],
)
STAGES = ("tokenizer", "vqvae", "pretrain", "convert", "data", "finetune", "export", "table", "retask", "ship")


def recipe() -> dict:
    return json.loads((HERE / "recipe.json").read_text())


def pg_edge(*args) -> list[str]:
    return [sys.executable, "-m", "pg_edge.cli", *map(str, args)]


def py(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def commands(stage: str, w: Path) -> list[list[str]]:
    r = recipe()
    if stage == "tokenizer":
        return [py("apps.demo_model.tokenizer", w / "tokenizer")]
    if stage == "vqvae":
        return [py("apps.demo_model.vqvae", w / "vae-oid-full.npz"),
                py("apps.demo_model.vqvae_decoder", w / "vae-oid-full.npz", VAE_SOURCE)]
    if stage == "pretrain":
        common = ["--tokenizer", w / "tokenizer", "--vae", w / "vae-oid-full.npz"]
        return [py("apps.demo_model.pretrain", *common, "-o", w / "hf_phase1", *phase)
                if i == 0 else
                py("apps.demo_model.pretrain", *common, "--init", w / f"hf_phase{i}", "-o",
                   w / ("hf_pretrained" if i == len(PRETRAIN) - 1 else f"hf_phase{i + 1}"), *phase)
                for i, phase in enumerate(PRETRAIN)]
    if stage == "convert":
        return [pg_edge("convert", w / "hf_pretrained", "-o", w / "pretrained", "--dtype", r["convert"]["dtype"],
                        "--force", "--quiet")]
    if stage == "data":
        return [py("apps.demo_model.finetune_data", "--vae", w / "vae-oid-full.npz", "-o", w / "ft_data",
                   "--train", r["finetune"]["train_images"], "--mix", r["finetune"]["mix"])]
    if stage == "finetune":
        f = r["finetune"]
        freeze = ["--freeze-vision"] if f.get("freeze_vision") else []
        return [pg_edge("finetune", w / "pretrained", "--data", w / "ft_data/train.jsonl", "--valid",
                        w / "ft_data/valid.jsonl", "--train", f["train"], *freeze, "--steps", f["steps"],
                        "--batch-size", f["batch_size"], "--lr", f["lr"], "--warmup", f["warmup"],
                        "--weight-decay", f["weight_decay"],
                        "--export", "fused", "-o", w / "finetuned", "--force")]
    if stage == "export":
        return [py("apps.demo_model.export_hf", w / "finetuned/model", "--like", w / "hf_pretrained", "-o",
                   w / "hf_finetuned")]
    if stage == "table":
        return [py("apps.demo_model.seg_table", "--model", w / "hf_finetuned", "--vae", VAE_SOURCE, "-o",
                   w / "seg_table.json")]
    if stage == "retask":
        # Phases as run (recipe.json "retask"), each from the previous one's output. A phase with
        # "table": "retaskN" takes its segment targets from a table of hf_retaskN's own codes
        # (the later phases did: the phase-1 model writes the same shapes with the codes it
        # was taught, 64x64 IoU 0.993 after decoding), the others from hf_finetuned's. A phase
        # with "grow" first deepens its input (apps/demo_model/grow.py); "float32": no bf16
        # autocast.
        out = []
        for i, t in enumerate(r["retask"]):
            last = i == len(r["retask"]) - 1
            table = w / "seg_table.json"
            if "table" in t:
                table = w / f"seg_table_{t['table']}.json"
                if not any(str(table) in c for c in out):
                    out.append(py("apps.demo_model.seg_table", "--model", w / f"hf_{t['table']}", "--vae", VAE_SOURCE,
                                  "-o", table))
            stop = ["--stop-at", t["stop_at"]] if "stop_at" in t else []
            decision = ["--decision", t["decision"]] if "decision" in t else []
            init = w / ("hf_finetuned" if i == 0 else f"hf_retask{i}")
            if "grow" in t:  # deeper stacks, the new layers starting as the identity (grow.py)
                grown = w / f"hf_retask{i}_grown"
                out.append(py("apps.demo_model.grow", init, "-o", grown, "--text-layers", t["grow"]["text_layers"],
                              "--vision-layers", t["grow"]["vision_layers"]))
                init = grown
            precision = ["--float32"] if t.get("float32") else []
            out.append(py("apps.demo_model.pretrain", "--tokenizer", w / "hf_finetuned", "--vae", table,
                          "--init", init,
                          "-o", HF_SOURCE if last else w / f"hf_retask{i + 1}", "--steps", t["steps"], *stop,
                          "--batch-size", t["batch_size"], "--lr", t["lr"], "--warmup", t["warmup"],
                          "--smooth-loc", 0, "--single", 0, "--mix", t["mix"], "--prompts", t["prompts"], *decision,
                          *precision,
                          "--start-index", t["start_index"], "--save-every", 250, "--threads", t.get("threads", 1)))
        return out
    if stage == "ship":
        q = r["quantize"]
        return [pg_edge("convert", HF_SOURCE, "-o", w / "float", "--dtype", r["convert"]["dtype"], "--force", "--quiet"),
                pg_edge("quantize", w / "float", "-o", SHIPPED, "--recipe", q["recipe"], "--group-size",
                        q["group_size"], "--force"),
                pg_edge("convert-vae", VAE_SOURCE, "-o", SHIPPED / "vae.safetensors", "--force"),
                py("apps.demo_model.samples")]
    raise ValueError(stage)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=ROOT / "build" / "demo_model")
    p.add_argument("--from", dest="start", choices=STAGES, default=STAGES[0])
    p.add_argument("--only", choices=STAGES, default=None)
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    stages = [a.only] if a.only else list(STAGES[STAGES.index(a.start):])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    times = {}
    for stage in stages:
        t0 = time.perf_counter()
        for cmd in commands(stage, a.work):
            print(f"\n== {stage}: {shlex.join(str(c) for c in cmd)}", flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        times[stage] = time.perf_counter() - t0
        print(f"== {stage} took {times[stage]:.0f} s", flush=True)
    print("\nstage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
