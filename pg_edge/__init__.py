"""pg_edge: Google's PaliGemma 1 and 2 on your own machine with MLX.

    import pg_edge
    pg = pg_edge.load("converted-folder-or-hub-id")
    print(pg.generate("cat.jpg", "caption en").text)
    hot = pg_edge.Sampling(temperature=0.7, top_p=0.9, seed=0)
    print(pg.generate("cat.jpg", "caption en", sampling=hot).text)

Read in this order (an image's path to the image tokens merged into the sequence):

    pipeline.py           `load` (folder -> PaliGemma); `PaliGemma.generate` -> `_start`
    inputs/processor.py   `PaliGemma.prepare` = `Processor.__call__`: images + prompts -> Inputs
                          (token ids int32[B, T], valid bool[B, T], pixels float32[B, S, S, 3])
    inputs/images.py      `preprocess_image`: path -> checked, upright, RGB, resized, [-1, 1]
    inputs/tokenizer.py   `prompt_ids`: `<image>` x N, `<bos>`, prefix, "\\n"
    pipeline.py           `PaliGemma.image_features`: pixels -> float[B, N, D], cached by hash
    model/paligemma.py    `encode_image` (model/siglip.py, then the projector); `embed` puts the
                          image features where the `<image>` ids are (the merge)
    generate.py           prefill and decode over that sequence (masks: model/masks.py)

Beside them: checkpoint/ (model folders on disk: find, check, read, write), model/ (the MLX
model and its config), cpu/ (the CPU backend's class variants), tasks/ (prompts, parsing
answers, the tasks as calls), errors.py, worker.py (the model's thread), adapters.py.

Attributes are imported lazily so that `pg_edge.reference` and `pg_edge.inputs` can be used
without importing MLX.
"""
__version__ = "0.1.0"

_LAZY = {
    "load": ("pg_edge.pipeline", "load"),
    "PaliGemma": ("pg_edge.pipeline", "PaliGemma"),
    "GenerationResult": ("pg_edge.generate", "GenerationResult"),
    "Sampling": ("pg_edge.generate", "Sampling"),
    "PgEdgeError": ("pg_edge.errors", "PgEdgeError"),
    "set_max_image_pixels": ("pg_edge.inputs.images", "set_max_image_pixels"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'pg_edge' has no attribute {name!r}")


__all__ = list(_LAZY)
