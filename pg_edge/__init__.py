"""pg_edge: Google's PaliGemma 1 and 2 on your own machine with MLX.

    import pg_edge
    pg = pg_edge.load("converted-folder-or-hub-id")
    print(pg.generate("cat.jpg", "caption en").text)
    hot = pg_edge.Sampling(temperature=0.7, top_p=0.9, seed=0)
    print(pg.generate("cat.jpg", "caption en", sampling=hot).text)

Read in this order (an image's path to the image tokens merged into the sequence):

    pipeline.py           `load` (folder -> PaliGemma); `PaliGemma.generate` -> `_request`
    inputs/processor.py   `PaliGemma.prepare` = `Processor.__call__`: images + prompts -> Inputs
                          (token ids int32[B, T], valid bool[B, T], pixels float32[B, S, S, 3])
    inputs/images.py      `preprocess_image`: path -> checked, upright, RGB, resized, [-1, 1]
    inputs/tokenizer.py   `prompt_ids`: `<image>` x N, `<bos>`, prefix, "\\n"
    pipeline.py           `PaliGemma.image_features`: pixels -> float[B, N, D], cached by hash
    model/paligemma.py    `encode_image` (model/siglip.py, then the projector); `embed` puts the
                          image features where the `<image>` ids are (the merge)
    batching.py           prefill and decode over that sequence, concurrent requests in one
                          batch (generate.py: the one-batch layers; masks: model/masks.py)
    scheduler.py          which requests join that batch and when (those arriving together
                          in one prefill)

Beside them: checkpoint/ (model folders on disk: find, check, read, write), model/ (the MLX
model and its config), cpu/ (the CPU backend's class variants), tasks/ (prompts, parsing
answers, the tasks as calls), errors.py, worker.py (the model's thread), adapters.py, and
adapter_bank.py + multi_lora.py (LoRA adapters by name on one shared base, per batch row).

Attributes are imported lazily so that `pg_edge.reference` and `pg_edge.inputs` can be used
without importing MLX. Before anything else, the first `import pg_edge...` loads the system's fast
BLAS (OpenBLAS on Linux) so that MLX, imported later, runs its float32 products on it
(blas.py; PG_EDGE_BLAS=off turns it off; `pg_edge.backend_info()` says what was found).
"""
from . import blas as _blas

_blas.load()  # must precede the first `import mlx.core` of the process (pg_edge/blas.py)

__version__ = "0.1.0"

_LAZY = {
    "load": ("pg_edge.pipeline", "load"),
    "PaliGemma": ("pg_edge.pipeline", "PaliGemma"),
    "GenerationResult": ("pg_edge.generate", "GenerationResult"),
    "Sampling": ("pg_edge.generate", "Sampling"),
    "PgEdgeError": ("pg_edge.errors", "PgEdgeError"),
    "set_max_image_pixels": ("pg_edge.inputs.images", "set_max_image_pixels"),
    "backend_info": ("pg_edge.blas", "backend_info"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'pg_edge' has no attribute {name!r}")


__all__ = list(_LAZY)
