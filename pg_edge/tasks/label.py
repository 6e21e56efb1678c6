"""Auto-labelling a folder of images into COCO JSON (`pg-edge label`).

    summary = label_folder(pg, "photos/", "cat ; dog", "labels.json", segment=True)

Output (COCO detection format; boxes [x, y, width, height] in pixels of the original image,
masks as COCO uncompressed RLE in `segmentation` with --segment):

    {"info": {...}, "images": [{"id", "file_name", "width", "height"}],
     "annotations": [{"id", "image_id", "category_id", "bbox", "area", "iscrowd": 0, ["segmentation"]}],
     "categories": [{"id", "name", "supercategory": "object"}],
     "pg_edge": {"task", "objects", "model", "folder", "model_folder", "done": [file names],
                 "skipped": [{"file", "reason"}], "unmatched": [{"file", "label"}]}}

`file_name` is the path relative to the folder; a name whose bytes are not UTF-8 is stored with
those bytes as backslash escapes (valid JSON for strict readers) and its exact bytes in hex as
`file_name_bytes`. `folder` and `model_folder` are the resolved image and model folders. Resumable: the file is rewritten atomically
every few seconds and at the end (also when interrupted); a run with the same output continues
where it stopped, skipping images already done or already reported; it refuses a file made from
another folder, model, task or objects, and a file whose fields do not have the shapes resuming
reads, in one line. A subfolder that cannot be listed is reported and recorded under `skipped`. The output is never the
image folder (nor inside it or around it), and an existing file that pg-edge label did not
write is never replaced, even with --force (`check_label_output`). Unreadable images are
skipped with a reason; detections whose label is not one of the requested names go to
`pg_edge.unmatched` instead of `annotations`.

Images run in batches of `pg.max_batch`: each batch's generations are asked for at once (from a
small thread pool) and decode together (pg_edge/batching.py); results are recorded in file
order, so a resumed run starts after the last image recorded.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from pg_edge.tasks import calls, prompts
from pg_edge.checkpoint.atomic import atomic_file
from pg_edge.errors import PgEdgeError
from pg_edge.tasks.calls import mask_to_rle
from pg_edge.checkpoint.output_check import inputs_overlap, why_not_ours
from pg_edge.inputs.images import load_image

SAVE_EVERY_S = 2.0


def image_files(folder: Path, unreadable: list | None = None) -> list[Path]:
    """Files under folder (recursively) whose extension Pillow knows, sorted by relative path.
    Subfolders that cannot be listed are appended to `unreadable` as (path, reason)."""
    exts = {e.lower() for e in Image.registered_extensions()}

    def failed(err: OSError) -> None:
        if unreadable is not None:
            unreadable.append((Path(err.filename), err.strerror or type(err).__name__))

    found = []
    for root, _, files in os.walk(folder, onerror=failed):
        found += [Path(root) / f for f in files if Path(f).suffix.lower() in exts and (Path(root) / f).is_file()]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def json_name(path: Path, folder: Path) -> str:
    """The relative path as it is stored: itself when it is UTF-8; a name with bytes that are not
    (stored by Python as lone surrogates, which strict JSON readers reject) gets them written as
    backslash escapes, e.g. "caf\\xe9.png" (`raw_name` keeps the exact bytes)."""
    rel = path.relative_to(folder).as_posix()
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return os.fsencode(rel).decode("utf-8", "backslashreplace")


def raw_name(path: Path, folder: Path) -> str | None:
    """Hex of the relative path's bytes for a name that is not UTF-8 (lossless), else None."""
    rel = path.relative_to(folder).as_posix()
    try:
        rel.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return os.fsencode(rel).hex()


def valid_text(text: str) -> str:
    """`text` with the bytes of a non-UTF-8 path (lone surrogates in Python) written as backslash
    escapes ("\\xe9"), so that strict JSON readers accept it."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _source(folder: Path, model_folder) -> dict:
    """What a labels file is made from, beside task/objects/model: resolved folders."""
    return {"folder": valid_text(str(folder.resolve())),
            "model_folder": valid_text(str(Path(model_folder).resolve())) if model_folder is not None else None}


def _new(objects: list[str], task: str, model: str, source: dict) -> dict:
    return {"info": {"description": f"pg-edge label ({task})", "date_created": time.strftime("%Y-%m-%d")},
            "images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(objects)],
            "pg_edge": {"task": task, "objects": objects, "model": model, **source, "done": [], "skipped": [],
                        "unmatched": []}}


def _shape_problem(coco) -> str | None:
    """Why a parsed labels file cannot be resumed (the fields resuming reads), or None."""
    def listing(obj, key, fields):
        items = obj.get(key)
        if not isinstance(items, list):
            return f'"{key}" is not a list'
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                return f'"{key}"[{i}] is not an object'
            for f, kind in fields.items():
                if not isinstance(item.get(f), kind) or isinstance(item.get(f), bool):
                    return f'"{key}"[{i}].{f} is not {kind.__name__ if isinstance(kind, type) else "a number"}'
        return None

    if not isinstance(coco, dict) or not isinstance(coco.get("pg_edge"), dict):
        return 'no "pg_edge" object'
    meta = coco["pg_edge"]
    if not isinstance(meta.get("done"), list) or not all(isinstance(n, str) for n in meta["done"]):
        return '"pg_edge.done" is not a list of file names'
    return (listing(meta, "skipped", {"file": str}) or listing(meta, "unmatched", {"file": str})
            or listing(coco, "images", {"id": int, "file_name": str})
            or listing(coco, "annotations", {"id": int, "image_id": int})
            or listing(coco, "categories", {"id": int, "name": str}))


def check_label_output(out, inputs, force: bool) -> None:
    """The labels file is never an input (the image folder, the model folder, the mask decoder),
    inside one or around one; an existing one must be a labels file pg-edge label wrote, whether
    it is resumed or, with `force`, replaced (pg_edge.checkpoint.output_check)."""
    inputs_overlap(Path(out), list(inputs))
    if os.path.lexists(out):
        why = why_not_ours(out, "labels")
        if why is not None:
            raise PgEdgeError(f"{out} exists and is not a labels file pg-edge label wrote ({why}); "
                              "pg-edge never replaces it, even with --force: choose another -o")


def _resume(out: Path, objects: list[str], task: str, model: str, source: dict, force: bool) -> dict:
    if force or not out.exists():
        return _new(objects, task, model, source)
    try:
        coco = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise PgEdgeError(f"{out} exists but is not a pg-edge label file ({str(err)[:120]}); choose "
                          "another -o") from None
    problem = _shape_problem(coco)
    if problem is not None:
        raise PgEdgeError(f"{out} cannot be resumed: {problem}; pass --force to start over or use another -o")
    meta = coco["pg_edge"]
    mine = {"task": task, "objects": objects, "model": model, **source}
    theirs = {k: meta.get(k) for k in mine}
    if theirs != mine:
        diff = ", ".join(f"{k} {theirs[k]!r} (now {mine[k]!r})" for k in mine if theirs[k] != mine[k])
        raise PgEdgeError(f"{out} was made from other inputs: {diff}; pass --force to start over or use "
                          "another -o")
    names = [c["name"] for c in coco["categories"]]
    if names != objects:
        raise PgEdgeError(f"{out} cannot be resumed: its categories {names} are not the objects {objects}; "
                          "pass --force to start over or use another -o")
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


def _add(coco: dict, file_name: str, result, raw: str | None = None) -> int:
    """Append the image and its annotations; -> number of annotations added. `raw`: hex of
    the name's bytes when it is not UTF-8 (stored as "file_name_bytes")."""
    meta = coco["pg_edge"]
    image_id = max((im["id"] for im in coco["images"]), default=0) + 1
    width, height = result.image_size
    image = {"id": image_id, "file_name": file_name, "width": width, "height": height}
    if raw is not None:
        image["file_name_bytes"] = raw
    coco["images"].append(image)
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
    check_label_output(out, [folder, getattr(pg, "folder", None), vae], force)
    # prompts.detect validates the names and writes them as "a ; b"; the categories are those.
    names = [n.strip() for n in prompts.detect(objects)[len("detect "):].split(" ; ")]
    task = "segment" if segment else "detect"
    source = _source(folder, getattr(pg, "folder", None))
    coco = _resume(out, names, task, model_name, source, force)
    meta = coco["pg_edge"]
    seen = set(meta["done"]) | {s["file"] for s in meta["skipped"]}
    unreadable: list = []
    files = [p for p in image_files(folder, unreadable) if json_name(p, folder) not in seen]
    decoder = calls.find_vae(pg, vae) if segment else None
    counts = {"images": 0, "annotations": 0, "skipped": 0, "resumed": len(seen)}
    for path, reason in unreadable:  # reported (once in the file), never silently left out
        name = json_name(path, folder) + "/"
        print(valid_text(f"skipped {name}: cannot read folder: {reason}"), file=sys.stderr)
        if name not in seen:
            meta["skipped"].append({"file": name, "reason": valid_text(f"cannot read folder: {reason}")})
            counts["skipped"] += 1
    t0 = last_save = time.perf_counter()
    size = max(1, getattr(pg, "max_batch", 1))
    jobs: list = []
    with ThreadPoolExecutor(max_workers=size, thread_name_prefix="pg_edge-label") as pool:
        try:
            for start in range(0, len(files), size):
                # A batch of images at once: their generations decode together (pg_edge.batching);
                # the results are written in file order, so a resume starts after the last one.
                chunk = list(enumerate(files[start:start + size], start + 1))
                jobs = [pool.submit(_label_one, pg, path, names, segment, decoder, gen or {}) for _, path in chunk]
                for (i, path), job in zip(chunk, jobs):
                    name = json_name(path, folder)
                    try:
                        result = job.result()
                    except _Unreadable as err:
                        reason = valid_text(str(err))
                        meta["skipped"].append({"file": name, "reason": reason})
                        counts["skipped"] += 1
                        print(f"\nskipped {name}: {reason}" if sys.stderr.isatty() else f"skipped {name}: {reason}",
                              file=sys.stderr)
                        _progress(i, len(files), name, "skipped", t0, quiet)
                        continue
                    n = _add(coco, name, result, raw_name(path, folder))
                    meta["done"].append(name)
                    counts["images"] += 1
                    counts["annotations"] += n
                    _progress(i, len(files), name, f"{n} object{'s' * (n != 1)}", t0, quiet)
                    if time.perf_counter() - last_save > SAVE_EVERY_S:
                        save_atomic(coco, out)
                        last_save = time.perf_counter()
        except BaseException:
            for job in jobs:  # Ctrl-C or an error: the batch's other generations are not waited for
                job.cancel()
            if hasattr(pg, "cancel"):
                pg.cancel()
            raise
        finally:
            save_atomic(coco, out)  # also on Ctrl-C: the next run resumes from here
    return counts


class _Unreadable(PgEdgeError):
    """An image file that cannot be read: skipped and recorded, the run goes on."""


def _label_one(pg, path: Path, names: list[str], segment: bool, decoder, gen: dict):
    """One image's detect / segment result (run in the labeling pool's threads)."""
    try:
        image = load_image(path)
    except PgEdgeError as err:
        raise _Unreadable(str(err)) from None
    if segment:
        if hasattr(pg, "segment"):  # PaliGemma: the mask decoder runs on the model's worker
            return pg.segment(image, names, vae=decoder, **gen)
        return calls.segment(pg, image, names, vae=decoder, **gen)
    return calls.detect(pg, image, names, **gen)
