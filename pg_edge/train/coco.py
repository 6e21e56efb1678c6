"""COCO detection files as fine-tuning examples: what `pg-edge label` writes, and COCO in general.

    examples = read_coco("labels.json", CocoOptions(images="photos/"))

Every image becomes one example (prompt "all", default) whose prefix names every category, in
the file's category order, and whose suffix lists that image's objects left to right:

    detect cat ; dog      <loc0123><loc0045><loc0678><loc0456> cat ; <loc...>x4 dog
    segment cat ; dog     <loc...>x4<seg012>...<seg087> cat ; ...      (with a mask encoder)

or, with prompt "each", one example per image and category ("detect cat" -> the cats only).
An image without objects of the prompt's categories gets the empty answer: a negative, trained
on `<eos>` alone. Boxes are COCO's [x, y, width, height] in pixels, turned into `<loc>` bins by
`parse.encode_box`, the inverse of the parser the model's answers go through.

Masks (`segmentation`: polygons, or RLE, uncompressed or compressed) become 16 `<seg>` codes:
the mask cropped to the box (whole pixels, as the decoder pastes it), resized to 64x64
bilinearly and encoded by the VQ-VAE encoder (pg_edge.train.mask_encoder). Task "auto" makes
segment examples when the file has masks and an encoder is given, else detect examples (with a
note when masks are left out); "segment" without an encoder is an error.

Images are found under `images` (default: the folder a `pg-edge label` file records, else the
JSON file's folder). Of a `pg-edge label` file only the images it finished (`pg_edge.done`) are
used: an image it never reached has no annotations but is no negative. Crowd annotations
(`iscrowd: 1`, regions of many objects) are left out, with a note.

Everything is checked before training: the file's size (at most MAX_BYTES) and JSON, each
image, category and annotation (ids integers and unique, every reference resolving, boxes
positive and inside their image to within one pixel, masks readable), each image present with
the size the file says; all problems go into one DataError line (the first few listed).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ImageError, PgEdgeError
from ..inputs.images import check_header
from ..tasks import parse, prompts
from ..tasks.calls import rle_to_mask
from .data import MAX_REPORTED, DataError, Example

MAX_BYTES = 1 << 30  # a COCO file is parsed whole in memory (several times its size)
EDGE_SLACK = 1.0  # pixels a box may pass the image's edge (rounding in other tools); clipped
TASKS = ("auto", "detect", "segment")
PROMPTS = ("all", "each")


@dataclass(frozen=True)
class CocoOptions:
    """images: the folder file names are relative to (None: see the module docstring);
    task: auto | detect | segment; prompt: all | each; vae: a vae-oid.npz-layout file with the
    mask encoder (for segment)."""

    images: str | os.PathLike | None = None
    task: str = "auto"
    prompt: str = "all"
    vae: str | os.PathLike | None = None


def is_coco(path: str | os.PathLike) -> bool:
    """A data source read as COCO: a file named *.json (JSONL files are *.jsonl)."""
    return Path(path).suffix.lower() == ".json"


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _load(src: Path):
    if not src.is_file():
        raise DataError(f"data file not found: {src}")
    size = src.stat().st_size
    if size > MAX_BYTES:
        raise DataError(f"{src} is {size / 2**30:.1f} GiB; COCO files over {MAX_BYTES >> 30} GiB are "
                        "refused (split it)")
    try:
        coco = json.loads(src.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{src} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{src} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except RecursionError:
        raise DataError(f"{src}: JSON nested too deeply for a COCO file") from None
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise DataError(f"{src} is not a COCO detection file (expected an object with the lists "
                        '"images", "annotations" and "categories")')
    return coco


def _image_root(coco: dict, src: Path, images) -> Path:
    if images is not None:
        root = Path(images).expanduser()
    else:
        meta = coco.get("pg_edge")
        folder = meta.get("folder") if isinstance(meta, dict) else None
        root = Path(folder) if isinstance(folder, str) else src.parent
    if not root.is_dir():
        raise DataError(f"image folder not found: {root} (pass --images DIR, the folder the file names "
                        "are relative to)")
    return root


def _file_path(img: dict, root: Path) -> Path | None:
    raw = img.get("file_name_bytes")  # pg-edge label's exact bytes of a name that is not UTF-8
    if isinstance(raw, str):
        try:
            return root / os.fsdecode(bytes.fromhex(raw))
        except ValueError:
            return None
    return root / img["file_name"] if isinstance(img.get("file_name"), str) and img["file_name"] else None


def _mask(seg, width: int, height: int) -> np.ndarray | str:
    """bool[H, W] of a COCO `segmentation`, or why it cannot be read."""
    if isinstance(seg, list):
        if not seg or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                              and all(_num(v) for v in p) for p in seg):
            return "polygons must be lists of at least 3 x, y pairs of numbers"
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for p in seg:
            draw.polygon([(float(p[i]), float(p[i + 1])) for i in range(0, len(p), 2)], fill=1)
        return np.asarray(canvas, dtype=bool)
    if isinstance(seg, dict):
        size = seg.get("size")
        if not (isinstance(size, list) and len(size) == 2 and size == [height, width]):
            return f"RLE size {size!r} is not the image's [height, width] = [{height}, {width}]"
        counts = seg.get("counts")
        if isinstance(counts, str):
            counts = _rle_counts(counts)
            if counts is None:
                return "compressed RLE counts are not valid"
        try:
            return rle_to_mask({"size": size, "counts": counts})
        except PgEdgeError as err:
            return str(err)
    return "segmentation must be polygons (a list) or RLE (an object)"


def _rle_counts(text: str) -> list[int] | None:
    """COCO's compressed RLE string -> run lengths (5 bits per character, offset 48, bit 6 says
    more follow, the sign in bit 5 of the last; from the third run on, a delta from the run two
    before), or None when malformed."""
    counts, p = [], 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text) or k > 12:
                return None
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        if x < 0:
            return None
        counts.append(x)
    return counts


def box_crop(mask: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """float32[64, 64] in [0, 1]: the mask inside the box (whole pixels, int() of the edges as
    the decoder pastes), resized bilinearly: the mask encoder's input."""
    x1, y1, x2, y2 = (int(v) for v in box)
    x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
    crop = Image.fromarray(mask[y1:y2, x1:x2].astype(np.uint8) * 255)
    return np.asarray(crop.resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255.0


def read_coco(source: str | os.PathLike, options: CocoOptions = CocoOptions(),
              note: Callable[[str], None] = lambda _: None) -> list[Example]:
    """The examples of a COCO detection file (see the module docstring); DataError naming every
    problem (the first MAX_REPORTED) in one line; `note` gets one-line remarks (masks left out,
    crowd annotations, images a labelling run did not reach)."""
    if options.task not in TASKS or options.prompt not in PROMPTS:
        raise PgEdgeError(f"COCO task must be one of {TASKS} and prompt one of {PROMPTS}")
    src = Path(source).expanduser()
    coco = _load(src)
    root = _image_root(coco, src, options.images)
    bad: list[str] = []

    cats: dict[int, str] = {}
    for i, c in enumerate(coco["categories"]):
        if not isinstance(c, dict) or not _int(c.get("id")) or not isinstance(c.get("name"), str):
            bad.append(f"categories[{i}]: needs an integer id and a string name")
            continue
        try:
            name = prompts.detect([c["name"]])[len("detect "):]
        except PgEdgeError as err:
            bad.append(f"categories[{i}]: {err}")
            continue
        if c["id"] in cats or name in cats.values():
            bad.append(f"categories[{i}]: duplicate id {c['id']} or name {name!r}")
        cats[c["id"]] = name
    if not cats and not bad:
        bad.append("no categories (the names the prompt asks for)")

    meta = coco.get("pg_edge") if isinstance(coco.get("pg_edge"), dict) else None
    done = set(meta["done"]) if meta and isinstance(meta.get("done"), list) else None
    images: dict[int, tuple[Path, int, int]] = {}
    not_done = 0
    for i, img in enumerate(coco["images"]):
        if not isinstance(img, dict) or not _int(img.get("id")):
            bad.append(f"images[{i}]: needs an integer id")
            continue
        w, h, path = img.get("width"), img.get("height"), _file_path(img, root)
        if not (_int(w) and _int(h) and w > 0 and h > 0) or path is None:
            bad.append(f"images[{i}] (id {img['id']}): needs a file_name and positive integer width and height")
            continue
        if img["id"] in images:
            bad.append(f"images[{i}]: duplicate id {img['id']}")
            continue
        if done is not None and img.get("file_name") not in done:
            not_done += 1
            continue
        try:
            size = check_header(path, str(path))
        except ImageError as err:
            bad.append(f"images[{i}]: {err}")
            continue
        if tuple(size) != (w, h):
            bad.append(f"images[{i}]: {path} is {size[0]}x{size[1]}, the file says {w}x{h}")
            continue
        images[img["id"]] = (path, w, h)
    if not_done:
        note(f"{src.name}: {not_done} image(s) the labelling run did not finish are left out")

    all_ids = {im["id"] for im in coco["images"] if isinstance(im, dict) and _int(im.get("id"))}
    objects: dict[int, list] = {k: [] for k in images}
    crowd, with_masks, no_mask = 0, [], []
    ids = set()
    for i, a in enumerate(coco["annotations"]):
        if not isinstance(a, dict) or not _int(a.get("id")) or not _int(a.get("image_id")) \
                or not _int(a.get("category_id")):
            bad.append(f"annotations[{i}]: needs integer id, image_id and category_id")
            continue
        if a["id"] in ids:
            bad.append(f"annotations[{i}]: duplicate id {a['id']}")
        ids.add(a["id"])
        if a["category_id"] not in cats:
            bad.append(f"annotations[{i}]: category_id {a['category_id']} is not in categories")
            continue
        if a["image_id"] not in images:
            if a["image_id"] not in all_ids:
                bad.append(f"annotations[{i}]: image_id {a['image_id']} is not in images")
            continue  # an image left out (not finished, or bad: reported above)
        if a.get("iscrowd"):
            crowd += 1
            continue
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_num(v) for v in bbox)):
            bad.append(f"annotations[{i}]: bbox must be [x, y, width, height] numbers, got {str(bbox)[:60]}")
            continue
        path, w, h = images[a["image_id"]]
        x, y, bw, bh = (float(v) for v in bbox)
        if bw <= 0 or bh <= 0:
            bad.append(f"annotations[{i}]: empty box {bbox}")
            continue
        if x < -EDGE_SLACK or y < -EDGE_SLACK or x + bw > w + EDGE_SLACK or y + bh > h + EDGE_SLACK:
            bad.append(f"annotations[{i}]: box {bbox} lies outside its image ({w}x{h}, {path.name})")
            continue
        box = (max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h)))
        obj = [box, a["category_id"], None]
        objects[a["image_id"]].append(obj)
        if a.get("segmentation") not in (None, [], {}):
            with_masks.append((i, obj, a["segmentation"], w, h))
        else:
            no_mask.append(i)
    if bad:
        more = f" (and {len(bad) - MAX_REPORTED} more)" if len(bad) > MAX_REPORTED else ""
        raise DataError(f"{len(bad)} problem(s) in {src}: " + "; ".join(bad[:MAX_REPORTED]) + more)
    if crowd:
        note(f"{src.name}: {crowd} crowd annotation(s) (iscrowd) left out")
    if not images:
        raise DataError(f"{src} has no usable images")

    task = _segment_or_detect(options, bool(with_masks), src, note)
    if task == "segment":
        if no_mask:  # left out of an answer, the object would be taught as absent
            raise DataError(f"{len(no_mask)} annotation(s) of {src} have no mask (segmentation), e.g. "
                            f"annotations[{no_mask[0]}]; segment targets need one per object (or train detect)")
        _encode_masks(with_masks, options.vae, src)
    return _examples(images, objects, cats, task, options.prompt, src)


def _segment_or_detect(options: CocoOptions, has_masks: bool, src: Path, note) -> str:
    from .mask_encoder import NoMaskEncoder, load_mask_encoder

    if options.task == "detect":
        return "detect"
    if options.task == "segment" and not has_masks:
        raise DataError(f"{src} has no masks (segmentation) to train segment on")
    if not has_masks:
        return "detect"
    why = "no VQ-VAE encoder given (--vae FILE: big_vision's vae-oid.npz has one)"
    if options.vae is not None:
        try:
            load_mask_encoder(options.vae)
            return "segment"
        except NoMaskEncoder as err:
            why = str(err)
    if options.task == "segment":
        raise DataError(f"cannot make <seg> targets from the masks of {src.name}: {why}")
    note(f"{src.name} has masks, but they cannot become <seg> targets: {why}; training on boxes only (detect)")
    return "detect"


def _encode_masks(with_masks: list, vae, src: Path) -> None:
    """Sets each object's 16 codes (obj[2]); DataError naming unreadable masks."""
    from .mask_encoder import load_mask_encoder

    encoder = load_mask_encoder(vae)
    bad, crops, objs = [], [], []
    for i, obj, seg, w, h in with_masks:
        mask = _mask(seg, w, h)
        if isinstance(mask, str):
            bad.append(f"annotations[{i}]: {mask}")
            continue
        crops.append(box_crop(mask, obj[0]))
        objs.append(obj)
    if bad:
        more = f" (and {len(bad) - MAX_REPORTED} more)" if len(bad) > MAX_REPORTED else ""
        raise DataError(f"{len(bad)} bad mask(s) in {src}: " + "; ".join(bad[:MAX_REPORTED]) + more)
    for start in range(0, len(crops), 256):
        codes = encoder.encode(np.stack(crops[start:start + 256]))
        for obj, c in zip(objs[start:start + 256], codes):
            obj[2] = tuple(int(v) for v in c)


def _examples(images, objects, cats, task: str, prompt: str, src: Path) -> list[Example]:
    names = [cats[k] for k in sorted(cats)]
    order = {k: n for n, k in enumerate(sorted(cats))}
    make = prompts.segment if task == "segment" else prompts.detect
    examples = []
    for image_id in sorted(images):
        path, w, h = images[image_id]
        objs = sorted(objects[image_id], key=lambda o: (o[0][0], o[0][1], order[o[1]]))
        groups = [names] if prompt == "all" else [[n] for n in names]
        for group in groups:
            answer = " ; ".join(
                parse.encode_box(o[0], (w, h)) + "".join(f"<seg{c:03d}>" for c in (o[2] or ()))
                + f" {cats[o[1]]}" for o in objs if cats[o[1]] in group)
            examples.append(Example(path, make(group), answer, f"{src.name} image {image_id}"))
    return examples
