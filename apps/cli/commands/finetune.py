"""`pg-edge finetune MODEL --data train.jsonl --train attn|lora|full -o OUT`: fine-tuning.

    pg-edge finetune pg2-3b-224 --data train.jsonl --valid valid.jsonl --train attn -o run1
    pg-edge finetune pg2-3b-224-q4 --data photos/ --train lora --freeze-vision -o run2
    pg-edge finetune pg2-3b-224 --data train.jsonl --train lora -o run2 --resume run2
    pg-edge finetune demo --data labels.json --train lora -o run3     # COCO, e.g. from pg-edge label

Everything that can fail on bad input (model folder, tokenizer, every data line, settings) is
checked before the output folder is created. OUT may not be, lie inside or contain the model
folder or the data; --force replaces only a folder pg-edge finetune wrote (pg_edge.checkpoint.output_check). OUT receives log.jsonl, checkpoints/step-N
(for --resume) and the export: OUT/adapters (adapters.safetensors + adapter_config.json) or
OUT/model (a converted folder for `pg-edge run` / `pg_edge.load`).

Settings left out take the mode's recipe (big_vision's where it has one; see
pg_edge/train/trainer.py RECIPES), or on --resume the checkpoint's own; a setting given
explicitly on --resume must equal the checkpoint's. Data parallel over local processes (each
takes its share of every batch; --batch-size stays the whole batch):
    mlx.launch -n 2 --python "$(which python)" -- "$(which pg-edge)" finetune MODEL ...
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from pg_edge.adapters import MODES
from pg_edge.train.coco import PROMPTS, TASKS

EXPORTS = ("adapters", "fused", "none")
# argparse dest -> TrainConfig field, for settings that default to the recipe / checkpoint.
CONFIG_ARGS = {
    "steps": "steps", "batch_size": "batch_size", "grad_accum": "grad_accum", "optimizer": "optimizer",
    "lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay", "warmup": "warmup",
    "clip": "clip_norm", "loss_norm": "normalize", "seed": "seed", "eval_every": "eval_every",
    "save_every": "save_every", "max_new_tokens": "max_new_tokens",
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune on image/prefix/suffix examples (attention-only, LoRA/QLoRA, or full)",
        description="Fine-tune PaliGemma as the paper recommends: prefix-LM attention, loss on the "
        "suffix only, a task prefix per example. DATA is a JSONL file of {\"image\", \"prefix\", "
        "\"suffix\"} objects (image paths relative to the file) or a folder holding labels.jsonl.",
    )
    p.add_argument("model", help="converted (or quantized, for lora) model folder or hub id")
    p.add_argument("--data", required=True, help="training JSONL file, a folder with labels.jsonl, or a COCO "
                   "detection *.json (what `pg-edge label` writes)")
    p.add_argument("--valid", default=None, help="validation JSONL / folder / COCO: loss and exact match / box IoU")
    p.add_argument("--train", dest="mode", choices=MODES, required=True,
                   help="attn: decoder attention only (big_vision's recipe); lora: adapters on the "
                   "decoder, connector (and vision unless --freeze-vision); full: everything "
                   "(with --resume: the checkpoint's mode)")
    p.add_argument("--freeze-vision", action="store_true", default=None,
                   help="keep SigLIP frozen (lora: no vision adapters; full: vision not trained)")
    c = p.add_argument_group("COCO data (--data / --valid *.json)")
    c.add_argument("--images", default=None, metavar="DIR",
                   help="folder the COCO file names are relative to (default: the folder `pg-edge label` "
                   "recorded, else the JSON file's folder)")
    c.add_argument("--coco-task", choices=TASKS, default="auto",
                   help="segment (masks -> <seg> codes; needs --vae with the encoder), detect (boxes), or "
                   "auto: segment when the file has masks and --vae has an encoder, else detect")
    c.add_argument("--coco-prompt", choices=PROMPTS, default="all",
                   help="all: one example per image naming every category; each: one per image and category")
    c.add_argument("--vae", default=None, metavar="FILE",
                   help="VQ-VAE with the mask encoder (big_vision's vae-oid.npz) for segment targets")
    g = p.add_argument_group("optimisation (default: the mode's recipe)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default 100)")
    g.add_argument("--batch-size", type=int, default=None, help="examples per step, all processes together (default 8)")
    g.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default 1)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default=None, help="the update rule")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0)")
    g.add_argument("--weight-decay", type=float, default=None, help="decoupled, multiplied by lr")
    g.add_argument("--warmup", type=float, default=None, help="linear warmup: a fraction of the steps (<1) or steps")
    g.add_argument("--clip", type=float, default=None, help="clip the global gradient norm (0: off)")
    g.add_argument("--loss-norm", choices=("example", "token"), default=None,
                   help="mean per example, then over examples (big_vision, default) or over all tokens")
    g.add_argument("--seed", type=int, default=None, help="data order, adapter init, dropout (default 0)")
    g.add_argument("--lora-rank", type=int, default=8, help="rank of each LoRA adapter")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="the update is scaled by alpha / rank")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    g.add_argument("--max-len", type=int, default=None, help="truncate suffixes to this many tokens per row")
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output", required=True, help="training folder (log, checkpoints, export)")
    o.add_argument("--export", choices=EXPORTS, default=None,
                   help="adapters (default for lora) or fused (a converted folder; default for attn/full)")
    o.add_argument("--eval-every", type=int, default=None, help="validate every N steps (default: at the end)")
    o.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default: at the end)")
    o.add_argument("--max-new-tokens", type=int, default=None, help="greedy validation length")
    o.add_argument("--resume", default=None, help="continue from a checkpoint folder or a training folder")
    o.add_argument("--force", action="store_true", help="replace an existing output folder")
    o.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def _settings(args, saved: dict | None):
    """(ModeSpec, TrainConfig) from the recipe or checkpoint, with the explicit arguments."""
    from pg_edge.adapters import LoraSettings, ModeSpec
    from pg_edge.errors import PgEdgeError
    from pg_edge.train.trainer import TrainConfig

    given = {field: getattr(args, dest) for dest, field in CONFIG_ARGS.items() if getattr(args, dest) is not None}
    lora = LoraSettings(args.lora_rank, args.lora_alpha, args.lora_dropout)
    if saved is None:
        return ModeSpec(args.mode, bool(args.freeze_vision), lora), TrainConfig.for_mode(args.mode, **given)
    spec = ModeSpec.from_dict(saved["mode"])
    if args.mode != spec.mode:
        raise PgEdgeError(f"the checkpoint trains --train {spec.mode}, not {args.mode}")
    if args.freeze_vision and not spec.freeze_vision:
        raise PgEdgeError("the checkpoint was trained without --freeze-vision")
    cfg = TrainConfig.from_dict({**saved["config"], **given})  # Trainer.resume checks what must match
    return spec, cfg


def run(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from pg_edge.errors import PgEdgeError
    from pg_edge.checkpoint.folder import read_config, resolve
    from pg_edge.checkpoint.output_check import check_output
    from pg_edge.inputs.checks import context_length
    from pg_edge.checkpoint.loader import load_model
    from pg_edge.inputs.tokenizer import Tokenizer
    from pg_edge.train.checkpoint import find_checkpoint, read_state
    from pg_edge.train.coco import CocoOptions, is_coco
    from pg_edge.train.data import load_dataset
    from pg_edge.train.export import save_adapters, save_fused
    from pg_edge.train.trainer import Trainer

    t0 = time.perf_counter()
    folder = resolve(args.model)
    tokenizer = Tokenizer(folder)
    config = read_config(folder)
    out = Path(args.output).expanduser()
    ckpt = find_checkpoint(args.resume) if args.resume else None
    spec, cfg = _settings(args, read_state(ckpt) if ckpt else None)
    group = mx.distributed.init()
    cfg.check(group.size())
    export = args.export or ("adapters" if spec.mode == "lora" else "fused")
    if spec.mode == "attn" and spec.freeze_vision and not args.quiet:
        print("note: --train attn never trains the vision tower; --freeze-vision changes nothing", file=sys.stderr)
    context = context_length(config)  # every example must fit it (a longer row crashes the step)
    if args.max_len is not None and not 1 <= args.max_len <= context:
        raise PgEdgeError(f"--max-len must be between 1 and the model's context of {context} tokens, "
                          f"got {args.max_len}")

    # The output is never the model or the data (nor inside or around them), and --force
    # replaces only a pg-edge training folder; then all data checks, before anything is written.
    check_output(out, bool(args.force or ckpt), kind="training", inputs=[folder, args.data, args.valid, args.images],
                 hint=f"pass --resume {out} to continue it or --force to replace it")
    size, n_img = config.vision.image_size, config.num_image_tokens
    given = [f for f, v in (("--images", args.images), ("--vae", args.vae)) if v is not None] + [
        f for f, v, d in (("--coco-task", args.coco_task, "auto"), ("--coco-prompt", args.coco_prompt, "all")) if v != d]
    if given and not any(d and is_coco(d) for d in (args.data, args.valid)):
        raise PgEdgeError(f"{', '.join(given)} apply to COCO data (a *.json --data or --valid); "
                          f"{args.data} is not one")
    coco = CocoOptions(args.images, args.coco_task, args.coco_prompt, args.vae)
    note = (lambda text: None) if args.quiet else (lambda text: print(f"note: {text}", file=sys.stderr))
    train = load_dataset(args.data, tokenizer, size, n_img, args.max_len, context=context, coco=coco, note=note)
    valid = load_dataset(args.valid, tokenizer, size, n_img, args.max_len, context=context, coco=coco,
                         note=note) if args.valid else None
    if out.exists() and args.force and not ckpt and group.rank() == 0:
        shutil.rmtree(out)

    model, config, folder = load_model(folder)
    trainer = Trainer(model, spec, cfg, train, valid, out=out, group=group, base_model=str(args.model),
                      quiet=args.quiet)
    if ckpt is not None:
        trainer.resume(ckpt)
    trainer.fit()
    if group.rank() != 0:
        return 0
    target = None
    if export == "adapters":
        target = save_adapters(model, spec, out / "adapters", base_model=str(args.model),
                               base_dtype=trainer.base_dtype, step=trainer.step, force=True)
    elif export == "fused":
        target = save_fused(model, folder, out / "model", base_dtype=trainer.base_dtype, force=True)
    if not args.quiet:
        last = next((r for r in reversed(trainer.history) if "loss" in r), None)
        loss = f", last loss {last['loss']:.4f}" if last else " (none left to train)"
        print(f"trained {trainer.step} steps in {time.perf_counter() - t0:.1f} s{loss}"
              + (f"; wrote {target}" if target else ""))
    return 0
