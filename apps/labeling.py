"""Auto-labelling a folder of images into COCO JSON (`pg-edge label`).

    summary = label_folder(pg, "photos/", "cat ; dog", "labels.json", segment=True)

Output (COCO detection format; boxes [x, y, width, height] in pixels of the original image,
masks as COCO uncompressed RLE in `segmentation` with --segment):

    {"info": {...}, "images": [{"id", "file_name", "width", "height"}],
     "annotations": [{"id", "image_id", "category_id", "bbox", "area", "iscrowd": 0, ["segmentation"]}],
     "categories": [{"id", "name", "supercategory": "object"}],
     "pg_edge": {"task", "objects", "model", "done": [file names], "skipped": [{"file", "reason"}],
                 "unmatched": [{"file", "label"}]}}

`file_name` is the path relative to the folder. Resumable: the file is rewritten atomically
every few seconds and at the end (also when interrupted); a run with the same output continues
where it stopped, skipping images already done or already reported. Unreadable images are
skipped with a reason; detections whose label is not one of the requested names go to
`pg_edge.unmatched` instead of `annotations`.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from PIL import Image

from pg_edge import model_tasks, task_text
from pg_edge.atomic import atomic_file
from pg_edge.errors import PgEdgeError
from pg_edge.model_tasks import mask_to_rle
from pg_edge.processor import load_image

SAVE_EVERY_S = 2.0


def image_files(folder: Path) -> list[Path]:
    """Files under folder (recursively) whose extension Pillow knows, sorted by relative path."""
    exts = {e.lower() for e in Image.registered_extensions()}
    return sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in exts),
                  key=lambda p: p.relative_to(folder).as_posix())


def _new(objects: list[str], task: str, model: str) -> dict:
    return {"info": {"description": f"pg-edge label ({task})", "date_created": time.strftime("%Y-%m-%d")},
            "images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(objects)],
            "pg_edge": {"task": task, "objects": objects, "model": model, "done": [], "skipped": [],
                        "unmatched": []}}


def _resume(out: Path, objects: list[str], task: str, model: str, force: bool) -> dict:
    if force or not out.exists():
        return _new(objects, task, model)
    try:
        coco = json.loads(out.read_text())
        meta = coco["pg_edge"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PgEdgeError(f"{out} exists but is not a pg-edge label file ({err}); pass --force "
                          "to overwrite it") from None
    mine = {"task": task, "objects": objects, "model": model}
    theirs = {k: meta.get(k) for k in mine}
    if theirs != mine:
        raise PgEdgeError(f"{out} was made with {theirs}, not {mine}; pass --force to start over "
                          "or use another -o")
    return coco


def save_atomic(coco: dict, out: Path) -> None:
    """Write the JSON so that readers see the old or the new file, never half of one."""
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(coco))


def _progress(i: int, total: int, name: str, note: str, t0: float, quiet: bool) -> None:
    if quiet:
        return
    width = 24
    filled = int(width * i / total) if total else width
    line = (f"label [{'#' * filled}{'.' * (width - filled)}] {i}/{total} {name[-32:]:<32} "
            f"{note:<14} {time.perf_counter() - t0:6.1f} s")
    if sys.stderr.isatty():
        print("\r" + line, end="" if i < total else "\n", file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


def _add(coco: dict, file_name: str, result) -> int:
    """Append the image and its annotations; -> number of annotations added."""
    meta = coco["pg_edge"]
    image_id = max((im["id"] for im in coco["images"]), default=0) + 1
    width, height = result.image_size
    coco["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    category = {c["name"]: c["id"] for c in coco["categories"]}
    next_id = max((a["id"] for a in coco["annotations"]), default=0) + 1
    added = 0
    for obj in [*result.objects, *result.unmatched]:  # names not asked for: "unmatched"
        if obj.label not in category:
            meta["unmatched"].append({"file": file_name, "label": obj.label})
            continue
        x1, y1, x2, y2 = (float(v) for v in obj.box)
        ann = {"id": next_id + added, "image_id": image_id, "category_id": category[obj.label],
               "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
               "area": round((x2 - x1) * (y2 - y1), 2), "iscrowd": 0}
        if obj.mask is not None:
            ann["segmentation"] = mask_to_rle(obj.mask)
            ann["area"] = int(obj.mask.sum())
        coco["annotations"].append(ann)
        added += 1
    return added


def label_folder(pg, folder, objects, output, *, segment: bool = False, vae=None,
                 gen: dict | None = None, force: bool = False, quiet: bool = False,
                 model_name: str = "") -> dict:
    """Detect (or segment) `objects` in every image under `folder` into COCO JSON at `output`.
    -> {"images", "annotations", "skipped", "resumed"} counts for this run."""
    folder, out = Path(folder), Path(output)
    if not folder.is_dir():
        raise PgEdgeError(f"not a folder: {folder}")
    # task_text.detect validates the names and writes them as "a ; b"; the categories are those.
    names = [n.strip() for n in task_text.detect(objects)[len("detect "):].split(" ; ")]
    task = "segment" if segment else "detect"
    coco = _resume(out, names, task, model_name, force)
    meta = coco["pg_edge"]
    seen = set(meta["done"]) | {s["file"] for s in meta["skipped"]}
    files = [p for p in image_files(folder) if p.relative_to(folder).as_posix() not in seen]
    decoder = model_tasks.find_vae(pg, vae) if segment else None
    counts = {"images": 0, "annotations": 0, "skipped": 0, "resumed": len(seen)}
    t0 = last_save = time.perf_counter()
    try:
        for i, path in enumerate(files, 1):
            name = path.relative_to(folder).as_posix()
            try:
                image = load_image(path)
            except PgEdgeError as err:
                meta["skipped"].append({"file": name, "reason": str(err)})
                counts["skipped"] += 1
                print(f"\nskipped {name}: {err}" if sys.stderr.isatty() else f"skipped {name}: {err}",
                      file=sys.stderr)
                _progress(i, len(files), name, "skipped", t0, quiet)
                continue
            if segment:
                result = model_tasks.segment(pg, image, names, vae=decoder, **(gen or {}))
            else:
                result = model_tasks.detect(pg, image, names, **(gen or {}))
            n = _add(coco, name, result)
            meta["done"].append(name)
            counts["images"] += 1
            counts["annotations"] += n
            _progress(i, len(files), name, f"{n} object{'s' * (n != 1)}", t0, quiet)
            if time.perf_counter() - last_save > SAVE_EVERY_S:
                save_atomic(coco, out)
                last_save = time.perf_counter()
    finally:
        save_atomic(coco, out)  # also on Ctrl-C: the next run resumes from here
    return counts
