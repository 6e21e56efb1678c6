"""pg_edge: Google's PaliGemma 1 and 2 on your own machine with MLX.

    import pg_edge
    pg = pg_edge.load("converted-folder-or-hub-id")
    print(pg.generate("cat.jpg", "caption en").text)
    hot = pg_edge.Sampling(temperature=0.7, top_p=0.9, seed=0)
    print(pg.generate("cat.jpg", "caption en", sampling=hot).text)

Attributes are imported lazily so that `pg_edge.reference` and `pg_edge.processor` can be used
without importing MLX. Before anything else, the first `import pg_edge...` loads the system's fast
BLAS (OpenBLAS on Linux) so that MLX, imported later, runs its float32 products on it
(pg_edge/blas.py; PG_EDGE_BLAS=off turns it off; `pg_edge.backend_info()` says what was found).
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
    "set_max_image_pixels": ("pg_edge.image_limits", "set_max_image_pixels"),
    "backend_info": ("pg_edge.blas", "backend_info"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'pg_edge' has no attribute {name!r}")


__all__ = list(_LAZY)
