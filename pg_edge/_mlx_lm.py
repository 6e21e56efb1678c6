"""The parts of mlx-lm pg_edge uses (KV caches, the sampler, the LoRA layer), without its package init.

`mlx_lm/__init__.py` imports its converter, generator and loader, hence transformers (and torch
when installed), for modules that need nothing but MLX (cost: docs/performance.md, "Start-up").
So when nothing has imported them yet, `defer_package_init` puts the real package module in
`sys.modules` with its `__init__` not yet run: its submodules import as usual (they only need
the package's `__path__`), and the first attribute the package itself lacks — `mlx_lm.load`,
`from mlx_lm import generate`, `mlx_lm.__version__` — runs the `__init__` in place, in that
same module object. Code that uses mlx-lm afterwards sees the whole package, and the classes
are the same objects either way. A package already imported is left as it is.
"""
from __future__ import annotations

import importlib.util
import sys
import threading


def defer_package_init(name: str) -> None:
    """Register package `name` with its `__init__` deferred to its first missing attribute."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not an installed package: the import below fails as it always would
    module = importlib.util.module_from_spec(spec)
    lock = threading.RLock()  # another thread asking meanwhile waits for the whole init
    state = ["deferred"]

    def __getattr__(attr: str):
        with lock:
            if state[0] == "deferred":
                state[0] = "running"  # the init's own lookups (`from . import x`) fall through
                try:
                    spec.loader.exec_module(module)
                finally:
                    state[0] = "done"
                    module.__dict__.pop("__getattr__", None)
        try:
            return module.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None

    module.__getattr__ = __getattr__
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:  # as an import does: `import a.b` then `a.b` works
        setattr(sys.modules[parent], child, module)


defer_package_init("mlx_lm")

# After the deferral (E402).
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402


def __getattr__(name: str):
    # LoRALinear on first use: inference without adapters never imports mlx_lm.tuner at all.
    if name == "LoRALinear":
        defer_package_init("mlx_lm.tuner")  # its init imports the trainer, and transformers
        from mlx_lm.tuner.lora import LoRALinear

        return LoRALinear
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["KVCache", "QuantizedKVCache", "RotatingKVCache", "make_sampler", "LoRALinear", "defer_package_init"]
