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
# The float model it was quantized from, in the official HF layout: in the repository, not in
# the installed package (convert it with `pg-edge convert apps/demo_model/hf -o DIR`).
FLOAT_SOURCE = "apps/demo_model/hf"


def float_source_note(folder) -> str:
    """" (...)" naming the demo's float source when `folder` is the shipped demo model, else ""
    (appended to messages that ask for "the float source")."""
    try:
        same = Path(folder).resolve() == MODEL_DIR
    except (TypeError, OSError):
        return ""
    return (f" (the demo's float source is {FLOAT_SOURCE} in the pg_edge repository: "
            f"pg-edge convert {FLOAT_SOURCE} -o demo-float --dtype float32)") if same else ""
