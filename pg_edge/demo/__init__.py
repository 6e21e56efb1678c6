"""The built-in `demo` model: a tiny PaliGemma 2 trained by this project on the shapes task.

`pg_edge.load("demo")` loads MODEL_DIR (a quantized converted folder shipped as package data);
SAMPLES are three images of the task (pg_edge/demo/shapes.py). How the model was made:
apps/demo_model/README.md in the repository (`make demo-model`).
"""
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / "model"
SAMPLES = tuple(sorted((HERE / "samples").glob("*.png")))
NAME = "demo"  # what pg_edge.load and the command line accept
