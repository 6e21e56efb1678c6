"""What a writing command may write over: the one rule every tool that writes applies first.

    out = check_output(args.output, args.force, kind="model", inputs=[source_folder])

Before anything is read into memory or written, `check_output`:

1. **Overlap.** Resolves the output and every input (symlinks followed, `..` removed) and
   refuses an output that is an input, lies inside an input folder, or is a folder holding an
   input (`inputs_overlap`). Applies with or without `--force`, whether the output exists or not.
2. **Exists.** Without `force`, an existing output is refused with `hint`.
3. **Ownership.** With `force`, an existing output is replaced only if pg-edge recognises it
   as its own output of that `kind` (`why_not_ours`); an empty folder also qualifies (nothing
   to lose). Anything else is refused, saying why.

Markers per kind, each written by the tool that makes that output:

    model     folder: config.json + a *.safetensors whose metadata has `pg_edge_version`
              (pg_edge.checkpoint.folder.FolderWriter: converters, quantizer, fused fine-tune export)
    adapters  folder: adapter_config.json with "format": "pg_edge-adapters"
    bundle    folder: manifest.json with "format": "pg-edge-bundle" (pg_edge.export)
    vae       file: safetensors metadata "format": "pg_edge.mask_decoder" (convert-vae)
    labels    file: JSON object with a "pg_edge" object holding "task" and "done" (pg-edge label)
    training  folder: only log.jsonl, checkpoints/, adapters/, model/ (and pg-edge temporary
              names), at least one of them present (pg-edge finetune's output folder)
    drawing   image file whose PNG "Software" text or JPEG/GIF comment is DRAWN_BY
              (`pg-edge detect|segment -o`, via `save_drawing`)

Errors are one-line PgEdgeErrors naming both paths.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

from ..errors import PgEdgeError

DRAWN_BY = "pg-edge"  # the marker `save_drawing` puts in an image's metadata
MAX_MARKER_BYTES = 64 << 20  # a manifest / adapter config read to recognise it; larger is not ours
TRAINING_NAMES = {"log.jsonl", "checkpoints", "adapters", "model"}
_TEMP = re.compile(r"^\.[^/]+\.(partial|float|old)-\d+-[0-9a-f]{8}(\.\w+)?$")  # pg_edge.checkpoint.atomic names


def resolved(path: str | os.PathLike) -> Path:
    """Absolute, `~` expanded, symlinks followed (as far as they exist), `..` removed."""
    return Path(os.path.realpath(Path(path).expanduser()))


def local_input(spec: str | os.PathLike | None) -> Path | None:
    """The local path a model/data argument names: an existing path, the built-in demo model for
    "demo" (as pg_edge.checkpoint.folder.resolve reads it), None for anything else (a hub id)."""
    if spec is None:
        return None
    p = Path(spec).expanduser()
    if os.path.lexists(p):
        return p
    if str(spec) == "demo":
        from ..demo import MODEL_DIR

        return Path(MODEL_DIR)
    return p if p.is_absolute() or str(spec).startswith(".") else None


def _inside(a: Path, b: Path) -> bool:
    """a == b or a lies under b (both resolved)."""
    return a == b or b in a.parents


def inputs_overlap(out: Path, inputs: Iterable) -> None:
    """Refuse `out` if it is, lies inside, or contains one of `inputs` (None entries skipped)."""
    o = resolved(out)
    for given in inputs:
        if given is None:
            continue
        i = resolved(given)
        if o == i:
            raise PgEdgeError(f"the output {out} is the input {given}; choose another output")
        if _inside(o, i):
            raise PgEdgeError(f"the output {out} lies inside the input {given}; choose an output outside it")
        if _inside(i, o):
            raise PgEdgeError(f"the output {out} contains the input {given}; choose an output that does not")


def _read_json(path: Path, max_bytes: int | None = MAX_MARKER_BYTES):
    if not path.is_file() or (max_bytes is not None and path.stat().st_size > max_bytes):
        return None
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def _safetensors_meta(path: Path) -> dict:
    try:
        from .safetensors_check import check_safetensors

        return check_safetensors(path).get("__metadata__") or {}
    except Exception:  # any unreadable file is simply not recognised
        return {}


def _model(p: Path) -> str | None:
    if not p.is_dir():
        return "it is not a folder"
    if not (p / "config.json").is_file():
        return "it has no config.json"
    if not any("pg_edge_version" in _safetensors_meta(f) for f in sorted(p.glob("*.safetensors"))[:2]):
        return "its weights do not carry pg-edge's pg_edge_version marker"
    return None


def _adapters(p: Path) -> str | None:
    cfg = _read_json(p / "adapter_config.json") if p.is_dir() else None
    ok = isinstance(cfg, dict) and cfg.get("format") == "pg_edge-adapters"
    return None if ok else "it has no adapter_config.json with format pg_edge-adapters"


def _bundle(p: Path) -> str | None:
    man = _read_json(p / "manifest.json") if p.is_dir() else None
    ok = isinstance(man, dict) and man.get("format") == "pg-edge-bundle"
    return None if ok else "it has no manifest.json with format pg-edge-bundle"


def _vae(p: Path) -> str | None:
    if not p.is_file():
        return "it is not a file"
    ok = _safetensors_meta(p).get("format") == "pg_edge.mask_decoder"
    return None if ok else "its metadata is not pg-edge's mask decoder format"


def _labels(p: Path) -> str | None:
    if not p.is_file():
        return "it is not a file"
    coco = _read_json(p, None)  # read whole, as a resume does: a big dataset's file is still ours
    meta = coco.get("pg_edge") if isinstance(coco, dict) else None
    ok = isinstance(meta, dict) and "task" in meta and isinstance(meta.get("done"), list)
    return None if ok else "it is not a labels file written by pg-edge label"


def _training(p: Path) -> str | None:
    if not p.is_dir():
        return "it is not a folder"
    names = [n for n in os.listdir(p) if not _TEMP.match(n)]
    other = sorted(set(names) - TRAINING_NAMES)
    if other:
        return f"it holds {other[0]!r}, which pg-edge finetune does not write"
    if not names:
        return "it holds nothing pg-edge finetune writes"
    return None


def _drawing(p: Path) -> str | None:
    if not p.is_file():
        return "it is not a file"
    try:
        from PIL import Image

        with Image.open(p) as im:
            info = im.info
    except Exception:
        return "it is not an image pg-edge drew"
    comment = info.get("comment", b"")
    comment = comment.decode("latin-1") if isinstance(comment, bytes) else str(comment)
    ok = info.get("Software") == DRAWN_BY or comment == DRAWN_BY
    return None if ok else "it is not an image pg-edge drew"


def save_drawing(image, path: str | os.PathLike) -> None:
    """Save a drawn image atomically, marked as pg-edge's (PNG text, JPEG/GIF comment) so that a
    later run may replace it; the format follows the file name."""
    from PIL import Image, PngImagePlugin

    from .atomic import atomic_file

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    kwargs: dict = {}
    if fmt == "PNG":
        kwargs["pnginfo"] = PngImagePlugin.PngInfo()
        kwargs["pnginfo"].add_text("Software", DRAWN_BY)
    elif fmt in ("JPEG", "GIF"):
        kwargs["comment"] = DRAWN_BY.encode()
    with atomic_file(path) as tmp:
        image.save(tmp, format=fmt, **kwargs)


OWNERS = {"model": _model, "adapters": _adapters, "bundle": _bundle, "vae": _vae,
          "labels": _labels, "training": _training, "drawing": _drawing}


def why_not_ours(path: str | os.PathLike, kind: str) -> str | None:
    """None if `path` is pg-edge's own output of `kind` (or an empty folder), else the reason."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
        return None
    if p.is_symlink():
        return "it is a symbolic link"
    return OWNERS[kind](p)


def check_output(out: str | os.PathLike, force: bool, *, kind: str, inputs: Iterable = (),
                 hint: str = "pass --force to overwrite it") -> Path:
    """The one output rule of every tool that writes (see the module docstring); returns the
    resolved output path. Raises PgEdgeError before anything is touched."""
    if kind not in OWNERS:
        raise ValueError(f"unknown output kind {kind!r}")
    inputs_overlap(Path(out), list(inputs))
    path = resolved(out)
    if not os.path.lexists(Path(out).expanduser()) and not path.exists():
        return path
    if not force:
        raise PgEdgeError(f"output {path} exists; {hint}")
    why = why_not_ours(Path(out).expanduser(), kind)
    if why is not None:
        raise PgEdgeError(f"{out} exists and is not a pg-edge {kind} output ({why}); pg-edge replaces "
                          "only what it wrote, even with --force: remove it yourself or choose another output")
    return path
