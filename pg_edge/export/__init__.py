"""Export a model's compute graphs into a bundle an app runs with MLX alone (C++, Swift).

`export_bundle` writes the bundle (bundle.py); graphs.py holds the traced functions.
"""
from .bundle import export_bundle

__all__ = ["export_bundle"]
