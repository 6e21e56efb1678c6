"""Data-parallel fine-tuning: 2 processes (mlx.launch, ring backend over loopback) compute the
same gradient, loss and update as 1 process on the whole batch.

The same file is the worker that mlx.launch starts (`python tests/train/test_train_distributed.py
MODEL DATA OUT`): each rank takes its shard of every micro-batch, Trainer all_sums the
gradients, rank 0 saves what it got.
"""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def setup(model_dir, data_dir, group=None):
    """A Trainer in attention mode with a batch of 4 in 2 micro-batches, token-normalised: the
    shards of a micro-batch hold different numbers of suffix tokens ("red" vs "blue")."""
    from pg_edge.checkpoint.loader import load_model
    from pg_edge.inputs.tokenizer import Tokenizer
    from pg_edge.train import ModeSpec, TrainConfig, Trainer, load_dataset

    data = load_dataset(data_dir, Tokenizer(model_dir), 28, 16)
    cfg = TrainConfig.for_mode("attn", steps=2, batch_size=4, grad_accum=2, normalize="token",
                               optimizer="adamw", lr=1e-3, clip_norm=1.0)
    return Trainer(load_model(model_dir)[0], ModeSpec("attn"), cfg, data, group=group, quiet=True)


def results(trainer) -> dict:
    """Gradient + loss of step 0, then the parameters after one full optimizer step."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    loss, grads, tokens = trainer.gradients(0)
    out = {f"grad/{k}": v for k, v in tree_flatten(grads)}
    out["loss"] = loss
    out["tokens"] = mx.array(tokens)
    trainer.train_step()
    out.update({f"param/{k}": v for k, v in tree_flatten(trainer.model.trainable_parameters())})
    return out


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def test_two_processes_match_one(converted, tmp_path):
    import mlx.core as mx

    from train_helpers import write_colour_set

    model_dir = converted(version=1)
    data_dir = write_colour_set(tmp_path / "d", 8, seed=0).parent
    out = tmp_path / "rank0.safetensors"
    launch = Path(sys.executable).parent / "mlx.launch"
    port = _free_port_pair()
    cmd = [str(launch), "-n", "2", "--backend", "ring", "--starting-port", str(port), "--cwd", str(ROOT),
           "--python", sys.executable, __file__, str(model_dir), str(data_dir), str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]

    two = mx.load(str(out))
    one = results(setup(model_dir, data_dir))
    assert set(one) == set(two)
    worst = 0.0
    for k in sorted(one):
        a, b = np.array(one[k]), np.array(two[k])
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=k)
        if k.startswith("grad/"):
            worst = max(worst, float(np.abs(a - b).max() / (np.abs(a).max() + 1e-12)))
    print(f"2 processes vs 1: loss {float(two['loss']):.6f} vs {float(one['loss']):.6f}, "
          f"largest relative gradient difference {worst:.2e}")


def main(model_dir: str, data_dir: str, out: str) -> None:
    import mlx.core as mx

    group = mx.distributed.init(strict=True, backend="ring")
    assert group.size() == 2, group.size()
    res = results(setup(model_dir, data_dir, group))
    if group.rank() == 0:
        mx.save_safetensors(out, res)


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "helpers")]
    main(*sys.argv[1:4])
