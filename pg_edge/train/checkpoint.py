"""Training checkpoints: what a resumed run needs to continue exactly as if never stopped.

    OUT/checkpoints/step-000120/
        trainable.safetensors   the parameters that train (adapters, or the trained weights)
        optimizer.safetensors   the optimizer state (step count, lr, moments), flattened
        state.json              step, mode, training settings, data fingerprint, base model

Data order and dropout randomness are pure functions of (seed, step) (see data.batch_indices
and Trainer.micro_batches), so the step and seed in state.json pin them; nothing else random
needs saving. The base weights are not saved: a resume loads the same base model again.

Every folder is written under a temporary name and renamed into place when complete
(pg_edge.checkpoint.folder.atomic_folder), so an interrupted save never leaves a half checkpoint that a
resume would pick up.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from .. import __version__
from ..errors import PgEdgeError
from ..checkpoint.atomic import save_safetensors
from ..checkpoint.folder import atomic_folder
from ..checkpoint.safetensors_check import load_safetensors

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
STATE = "state.json"


def step_dir(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"{PREFIX}{step:06d}"


def save_checkpoint(out: Path, model: nn.Module, optimizer: optim.Optimizer, step: int, state: dict,
                    keep: int = 2) -> Path:
    """Write OUT/checkpoints/step-N atomically; keep only the newest `keep` checkpoints."""
    target = step_dir(out, step)
    with atomic_folder(target) as tmp:
        save_safetensors(tmp / "trainable.safetensors", dict(tree_flatten(model.trainable_parameters())))
        save_safetensors(tmp / "optimizer.safetensors", dict(tree_flatten(optimizer.state)))
        meta = {"step": step, "pg_edge_version": __version__, **state}
        (tmp / STATE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if keep > 0:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints under OUT, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.name.startswith(PREFIX) and (d / STATE).is_file()]
    return sorted(found, key=lambda d: d.name)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest one under a training output folder."""
    p = Path(path).expanduser()
    if (p / STATE).is_file():
        return p
    found = list_checkpoints(p)
    if not found:
        raise PgEdgeError(f"no checkpoint to resume from in {p} (expected {CHECKPOINTS}/{PREFIX}N/{STATE})")
    return found[-1]


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / STATE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PgEdgeError(f"cannot read {ckpt / STATE}: {err}") from None


def _load(f: Path) -> dict:
    try:
        return load_safetensors(f)[0]  # header checked in Python first
    except (RuntimeError, ValueError, OSError) as err:
        raise PgEdgeError(f"cannot read {f} (truncated or corrupt?): {str(err).splitlines()[0]}") from None


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: optim.Optimizer) -> dict:
    """Put the checkpoint's trainable parameters into `model` (already in the same mode) and
    its state into `optimizer`; returns state.json. Refuses any mismatch of names or shapes."""
    state = read_state(ckpt)
    params = _load(ckpt / "trainable.safetensors")
    have = dict(tree_flatten(model.trainable_parameters()))
    if set(params) != set(have):
        extra, missing = sorted(set(params) - set(have)), sorted(set(have) - set(params))
        raise PgEdgeError(f"checkpoint {ckpt} does not fit this model's trainable parameters "
                          f"(missing {missing[:2]}, unexpected {extra[:2]})")
    for k, v in params.items():
        if v.shape != have[k].shape:
            raise PgEdgeError(f"checkpoint {ckpt}: {k} has shape {v.shape}, the model {have[k].shape}")
    model.load_weights(list(params.items()), strict=False)

    saved = _load(ckpt / "optimizer.safetensors")
    optimizer.init(model.trainable_parameters())
    want = {k for k, _ in tree_flatten(optimizer.state)}
    if want != set(saved):
        raise PgEdgeError(f"checkpoint {ckpt}: optimizer state does not match this optimizer "
                          f"({len(saved)} saved tensors, {len(want)} expected)")
    optimizer.state = tree_map_with_path(lambda path, v: saved[path], optimizer.state)
    mx.eval(model.parameters(), optimizer.state)
    return state
