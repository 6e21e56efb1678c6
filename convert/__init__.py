"""Official PaliGemma checkpoints -> pg_edge converted folders (MLX safetensors).

    hf.py          Hugging Face folders / hub ids (any of the three key layouts)
    big_vision.py  big_vision .npz checkpoints (npz.py reads them, split or whole, in place)
    vae.py         big_vision's vae-oid.npz -> the mask decoder file
The folder itself (layout, atomic writer, side files) is the runtime's: pg_edge/checkpoint/folder.py.
"""
from __future__ import annotations

DTYPES = ("bfloat16", "float16", "float32")


def parse_dtype(name: str):
    """--dtype name -> mlx dtype, or a one-line error."""
    import mlx.core as mx

    from pg_edge.errors import PgEdgeError

    if name not in DTYPES:
        raise PgEdgeError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(mx, name)
