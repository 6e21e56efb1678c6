"""The training loop: optimizer and schedule, gradient accumulation, clipping, data parallelism,
validation, checkpoints and resume.

One optimizer step takes `batch_size` examples (the global batch). It is cut into `grad_accum`
micro-batches, and each micro-batch into one shard per process (mx.distributed); every shard's
loss is normalised by the whole batch's example or token count (loss.py), so the sum of the
shards' gradients over micro-batches and processes (`mx.distributed.all_sum`) is exactly the
gradient of the whole batch. Dividing a sum of per-shard means by the number of shards would
be exact only when all shards hold the same number of suffix tokens.

Schedule: linear warmup from 0 to lr, then cosine decay to 0 (mlx.optimizers schedules).
Optimizers: SGD (optional momentum) and AdamW. Recipes per mode follow big_vision (see RECIPES).

Randomness (adapter init, LoRA dropout, data order) derives from (seed, step) only, so a run
resumed from a checkpoint computes the same losses as one never stopped.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..blas import all_cores
from ..checkpoint.atomic import atomic_file
from ..errors import PgEdgeError
from ..model.paligemma import PaliGemmaModel
from ..inputs.checks import context_length
from .checkpoint import find_checkpoint, load_checkpoint, read_state, save_checkpoint
from .data import Dataset, batch_indices, split
from .evaluate import evaluate
from .loss import NORMALIZATIONS, loss_inputs, weighted_loss
from ..adapters import ModeSpec, apply_mode, base_dtype, count_parameters

# Defaults per mode. attn: big_vision's colab (SGD 0.03, 10% warmup, no clipping). full:
# big_vision's transfer configs (Adam 1e-5, clip 1.0, 5% warmup, wd 3e-7). big_vision decays
# weights by wd * schedule per step, MLX's AdamW by lr * wd: 0.03 * 1e-5 = 3e-7. lora: the
# common LoRA setting (AdamW 2e-4).
RECIPES = {
    "attn": dict(optimizer="sgd", lr=0.03, warmup=0.1, clip_norm=0.0, weight_decay=0.0),
    "lora": dict(optimizer="adamw", lr=2e-4, warmup=0.05, clip_norm=1.0, weight_decay=0.0),
    "full": dict(optimizer="adamw", lr=1e-5, warmup=0.05, clip_norm=1.0, weight_decay=0.03),
}
OPTIMIZERS = ("sgd", "adamw")


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # examples per optimizer step, over all micro-batches and processes
    grad_accum: int = 1
    optimizer: str = "adamw"
    lr: float = 2e-4
    momentum: float = 0.0  # SGD only
    weight_decay: float = 0.0
    warmup: float = 0.05  # a fraction of `steps` when < 1, else a number of steps
    clip_norm: float = 1.0  # global gradient norm; 0 = no clipping
    normalize: str = "example"
    seed: int = 0
    eval_every: int = 0  # 0: validate only at the end
    save_every: int = 0  # 0: checkpoint only at the end
    keep_checkpoints: int = 2
    eval_batch_size: int = 8
    max_new_tokens: int = 0  # greedy validation length; 0: longest reference + 2

    # Settings a resumed run must share with the checkpoint to continue the same run.
    SAME_ON_RESUME = ("batch_size", "grad_accum", "optimizer", "lr", "momentum", "weight_decay",
                      "warmup", "clip_norm", "normalize", "seed")

    @classmethod
    def for_mode(cls, mode: str, **overrides) -> "TrainConfig":
        """The mode's recipe, with any non-None overrides."""
        values = {**RECIPES[mode], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**values)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def check(self, world: int = 1) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise PgEdgeError(msg)
        need(self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}")
        need(self.batch_size % (self.grad_accum * world) == 0,
             f"--batch-size {self.batch_size} must divide into --grad-accum {self.grad_accum} x "
             f"{world} process(es)")
        need(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}")
        need(self.clip_norm >= 0, f"--clip must be >= 0, got {self.clip_norm}")
        need(self.normalize in NORMALIZATIONS, f"--loss-norm must be one of {', '.join(NORMALIZATIONS)}")

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup * self.steps)) if self.warmup < 1 else int(self.warmup)


def schedule(cfg: TrainConfig) -> Callable:
    """Linear warmup 0 -> lr over warmup_steps, then cosine decay to 0 at `steps`."""
    warm = min(cfg.warmup_steps, cfg.steps - 1)
    decay = optim.cosine_decay(cfg.lr, max(cfg.steps - warm, 1))
    if warm == 0:
        return decay
    # Update k uses schedule(k): start at lr / (warm + 1), not 0, so no step is wasted.
    ramp = optim.linear_schedule(cfg.lr / (warm + 1), cfg.lr, warm)
    return optim.join_schedules([ramp, decay], [warm])


def build_optimizer(cfg: TrainConfig, lr: Callable) -> optim.Optimizer:
    if cfg.optimizer == "sgd":
        return optim.SGD(learning_rate=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # Bias correction on, as in optax's Adam that big_vision uses: without it the first steps
    # are ~3x larger than lr (m / sqrt(v) starts at 0.1 / sqrt(0.001)).
    return optim.AdamW(learning_rate=lr, weight_decay=cfg.weight_decay, bias_correction=True)


def rng_seed(*parts: int) -> int:
    """A 32-bit seed from integers (seed, step, micro-batch, rank)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class Progress:
    """One line per step on stderr (redrawn in place in a terminal)."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.quiet, self.t0 = total, quiet, time.perf_counter()

    def step(self, step: int, loss: float, lr: float, tok_s: float) -> None:
        if self.quiet:
            return
        peak = mx.get_peak_memory() / 1e9
        line = (f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tok_s:,.0f} tok/s  "
                f"peak {peak:.2f} GB  {time.perf_counter() - self.t0:.0f} s")
        tty = sys.stderr.isatty()
        print(("\r" + line) if tty else line, end="" if tty and step < self.total else "\n",
              file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            print(("\n" if sys.stderr.isatty() else "") + text, file=sys.stderr, flush=True)


class Trainer:
    """Fine-tune `model` (a loaded PaliGemmaModel) in the mode of `spec` on `train`.

    out: the training folder (checkpoints, log.jsonl); None keeps everything in memory.
    group: an mx.distributed group for data parallelism (None: mx.distributed.init()).
    """

    def __init__(self, model: PaliGemmaModel, spec: ModeSpec, cfg: TrainConfig, train: Dataset,
                 valid: Dataset | None = None, out: str | Path | None = None, group=None,
                 base_model: str = "", quiet: bool = False):
        self.group = group if group is not None else mx.distributed.init()
        self.rank, self.world = self.group.rank(), self.group.size()
        cfg.check(self.world)
        context = context_length(model.config)
        for data in (train, valid):  # a row past the context would crash the gradient step
            if data is not None:
                data.check_context(context)
        self.model, self.spec, self.cfg = model, spec, cfg
        self.train_data, self.valid_data = train, valid
        self.out = Path(out) if out is not None else None
        self.base_model = base_model
        self.base_dtype = base_dtype(model)
        mx.random.seed(rng_seed(cfg.seed, 1 << 30))  # adapter initialisation (a "step" never reached)
        self.trainable = apply_mode(model, spec)
        model.train()
        self.schedule = schedule(cfg)
        self.optimizer = build_optimizer(cfg, self.schedule)
        self.optimizer.init(model.trainable_parameters())
        self.loss_and_grad = nn.value_and_grad(model, weighted_loss)
        self.step = 0
        self.history: list[dict] = []
        self.progress = Progress(cfg.steps, quiet or self.rank != 0)

    # -- one step -------------------------------------------------------------------------
    def micro_batches(self, step: int):
        """Yield (k, this process's Batch of micro-batch k, the global denominator)."""
        cfg, data = self.cfg, self.train_data
        index = batch_indices(len(data), cfg.batch_size, step, cfg.seed)
        denom = float(len(index)) if cfg.normalize == "example" else float(data.loss_tokens(index).sum())
        for k in range(cfg.grad_accum):
            mine = split(split(index, cfg.grad_accum, k), self.world, self.rank)
            yield k, data.batch(mine), denom

    def gradients(self, step: int) -> tuple[mx.array, dict, int]:
        """(loss, gradients, tokens) of the whole batch of `step`, summed over micro-batches
        and processes; the same on every process."""
        loss, grads, tokens = mx.array(0.0), None, 0
        for k, batch, denom in self.micro_batches(step):
            mx.random.seed(rng_seed(self.cfg.seed, step, k, self.rank))  # LoRA dropout
            value, g = self.loss_and_grad(self.model, **loss_inputs(batch, self.cfg.normalize, denom))
            grads = g if grads is None else tree_map(mx.add, grads, g)
            loss = loss + value
            tokens += batch.num_tokens
            mx.eval(loss, grads)  # one micro-batch's graph in memory at a time
        if self.world > 1:
            grads = tree_map(lambda x: mx.distributed.all_sum(x, group=self.group), grads)
            loss = mx.distributed.all_sum(loss, group=self.group)
            tokens = int(mx.distributed.all_sum(mx.array(tokens), group=self.group).item())
            mx.eval(loss, grads)
        return loss, grads, tokens

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        lr = float(self.schedule(mx.array(self.step)))  # the rate this update uses
        loss, grads, tokens = self.gradients(self.step)
        if self.cfg.clip_norm > 0:
            grads, norm = optim.clip_grad_norm(grads, self.cfg.clip_norm)
        else:
            norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state, norm)
        self.step += 1
        dt = time.perf_counter() - t0
        rec = {"step": self.step, "loss": float(loss), "lr": lr, "grad_norm": float(norm),
               "tokens_per_s": tokens / dt, "peak_memory_gb": mx.get_peak_memory() / 1e9}
        self.progress.step(self.step, rec["loss"], lr, rec["tokens_per_s"])
        return rec

    # -- the loop -------------------------------------------------------------------------
    def fit(self, until: int | None = None) -> list[dict]:
        """Train to `cfg.steps` (or stop early at `until`), validating and checkpointing."""
        stop = min(until or self.cfg.steps, self.cfg.steps)
        self.progress.note(f"training {count_parameters(self.model, trainable=True):,} of "
                           f"{count_parameters(self.model):,} parameters ({self.spec.mode}"
                           f"{', vision frozen' if self.spec.freeze_vision else ''}) on "
                           f"{len(self.train_data)} examples, {self.world} process(es)")
        # training's products stay whole (not split over the CPU streams): OpenBLAS's threads
        # use the cores (pg_edge/blas.py)
        with all_cores():
            while self.step < stop:
                rec = self.train_step()
                self._log(rec)
                last = self.step == self.cfg.steps
                if self.valid_data is not None and (last or (self.cfg.eval_every and self.step % self.cfg.eval_every == 0)):
                    self.validate()
                if self.out is not None and (last or (self.cfg.save_every and self.step % self.cfg.save_every == 0)):
                    self.save()
        return self.history

    def validate(self) -> dict | None:
        """Validation on process 0 (the others go on and wait at the next all_sum)."""
        if self.rank != 0 or self.valid_data is None:
            return None
        res = evaluate(self.model, self.valid_data, self.cfg.normalize, self.cfg.eval_batch_size,
                       self.cfg.max_new_tokens or None)
        rec = {"step": self.step, **res}
        metric = "  ".join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float))
        self.progress.note(f"validation at step {self.step}: {metric}  e.g. {res['samples'][:2]}")
        self._log(rec)
        return rec

    def _log(self, rec: dict) -> None:
        self.history.append(rec)
        if self.out is not None and self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    # -- checkpoints ----------------------------------------------------------------------
    def state(self) -> dict:
        return {"mode": self.spec.to_dict(), "config": asdict(self.cfg), "base_model": self.base_model,
                "data": self.train_data.fingerprint(), "examples": len(self.train_data),
                "base_dtype": str(self.base_dtype).split(".")[-1]}

    def save(self) -> Path | None:
        if self.rank != 0 or self.out is None:
            return None
        return save_checkpoint(self.out, self.model, self.optimizer, self.step, self.state(),
                               keep=self.cfg.keep_checkpoints)

    def resume(self, path: str | Path) -> int:
        """Continue from a checkpoint (a step folder, or a training folder: its newest)."""
        ckpt = find_checkpoint(path)
        saved = read_state(ckpt)
        if ModeSpec.from_dict(saved["mode"]) != self.spec:
            raise PgEdgeError(f"checkpoint {ckpt} was trained with {saved['mode']}, this run asks for "
                              f"{self.spec.to_dict()}")
        old = saved.get("config", {})
        diff = [f"{k}={old.get(k)!r} (now {getattr(self.cfg, k)!r})" for k in TrainConfig.SAME_ON_RESUME
                if k in old and old[k] != getattr(self.cfg, k)]
        if diff:
            raise PgEdgeError(f"checkpoint {ckpt} was trained with other settings: {', '.join(diff)}")
        if saved.get("data") != self.train_data.fingerprint():
            raise PgEdgeError(f"checkpoint {ckpt} was trained on other data (fingerprint {saved.get('data')}, "
                              f"now {self.train_data.fingerprint()})")
        load_checkpoint(ckpt, self.model, self.optimizer)
        self.step = int(saved["step"])
        self._trim_log()
        self.progress.note(f"resumed from {ckpt} at step {self.step}")
        return self.step

    def _trim_log(self) -> None:
        """Drop log.jsonl records past the resumed step (logged after the checkpoint, by the run
        that stopped; they are trained again) and any torn last line, so no step appears twice."""
        log = self.out / "log.jsonl" if self.out is not None and self.rank == 0 else None
        if log is None or not log.is_file():
            return
        kept = []
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= self.step:
                kept.append(line + "\n")
        with atomic_file(log) as tmp:
            tmp.write_text("".join(kept), encoding="utf-8")
