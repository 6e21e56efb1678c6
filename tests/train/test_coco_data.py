"""COCO detection files as fine-tuning data (pg_edge/train/coco.py, issue 22 item 6): boxes ->
<loc> answers the parser reads back, negatives, masks -> <seg> codes through the VQ-VAE encoder
(checked against the demo's torch VQ-VAE), no encoder -> boxes only with a note, and hostile
files -> one DataError line, through `pg-edge finetune` too (nothing written)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pg_edge
from pg_edge.tasks import calls, parse
from pg_edge.cli import main
from pg_edge.demo import SAMPLES
from pg_edge.train import coco as C
from pg_edge.train.data import DataError, Dataset
from pg_edge.train.mask_encoder import NoMaskEncoder, load_mask_encoder

DEMO_VAE = Path(__file__).resolve().parents[2] / "apps" / "demo_model" / "vae-oid.npz"  # decoder only


def write(path, coco):
    path.write_text(json.dumps(coco))
    return path


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    Image.new("RGB", (200, 100), (128, 128, 128)).save(d / "a.png")
    Image.new("RGB", (50, 80), (200, 20, 20)).save(d / "b.png")
    return d


def base_coco():
    return {"images": [{"id": 1, "file_name": "a.png", "width": 200, "height": 100},
                       {"id": 2, "file_name": "b.png", "width": 50, "height": 80}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [100, 10, 50, 80]},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 40]}]}


def test_boxes_become_loc_answers_the_parser_reads_back(photos):
    src = write(photos / "labels.json", base_coco())
    a, b = C.read_coco(src)
    assert a.prefix == "detect cat ; dog" and b.prefix == "detect cat ; dog"
    assert b.suffix == ""  # no object in b.png: a negative
    assert a.suffix.endswith(" dog") and " cat ; " in a.suffix  # left to right: the cat first
    parsed = parse.parse_objects(a.suffix, (200, 100)).objects
    assert [o.label for o in parsed] == ["cat", "dog"]
    for o, want in zip(parsed, [(10, 20, 40, 60), (100, 10, 150, 90)]):
        assert np.allclose(o.box, want, atol=0.5 * 200 / 1023)  # within half a bin

    each = C.read_coco(src, C.CocoOptions(prompt="each"))
    assert [(e.prefix, e.suffix.split()[-1] if e.suffix else "") for e in each] == [
        ("detect cat", "cat"), ("detect dog", "dog"), ("detect cat", ""), ("detect dog", "")]


def test_a_negative_trains_eos_alone(photos):
    pg = pg_edge.load("demo")
    examples = C.read_coco(write(photos / "labels.json", base_coco()))
    ds = Dataset(examples, pg.tokenizer, 224, pg.config.num_image_tokens)
    batch = ds.batch([1])
    assert batch.loss_mask.sum() == 1
    assert batch.input_ids[0][batch.loss_mask[0]].tolist() == [pg.tokenizer.eos_id]


def test_pg_edge_label_output_round_trips_to_the_models_own_answers(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for s in SAMPLES:
        shutil.copy(s, photos / s.name)
    labels = tmp_path / "labels.json"
    objects = "circle ; square ; triangle"
    assert main(["label", "demo", str(photos), "--detect", objects, "-o", str(labels), "--quiet"]) == 0
    pg = pg_edge.load("demo")
    examples = C.read_coco(labels)  # images found in the folder the file records
    assert len(examples) == len(SAMPLES)
    for ex in examples:
        assert ex.prefix == "detect " + objects
        # The model's well-formed objects, re-encoded (a malformed one, e.g. three <loc> tokens,
        # is skipped by the parser, so label never files it).
        answer = calls.detect(pg, str(ex.image), objects)
        got = parse.parse_objects(ex.suffix, answer.image_size).objects
        assert [(o.label, o.box) for o in got] == [(o.label, o.box) for o in answer.objects + answer.unmatched]

    coco = json.loads(labels.read_text())  # an unfinished run: only the images it did are used
    coco["pg_edge"]["done"] = coco["pg_edge"]["done"][:1]
    notes = []
    assert len(C.read_coco(write(labels, coco), note=notes.append)) == 1
    assert "did not finish" in notes[0]


# -- masks ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vae_with_encoder(tmp_path_factory):
    """A vae-oid.npz-layout file of the demo's torch VQ-VAE (random weights) and that model."""
    torch = pytest.importorskip("torch")
    from apps.demo_model.vqvae import VQVAE

    torch.manual_seed(0)
    model = VQVAE()
    path = tmp_path_factory.mktemp("vae") / "vae-oid.npz"
    np.savez(path, **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    return path, model


def rle_string(counts):
    """COCO's compressed RLE of run lengths (written here from the format's description)."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = not ((c & 0x10 == 0 and x == 0) or (c & 0x10 and x == -1))
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def test_the_encoder_equals_the_torch_vq_vae(vae_with_encoder):
    torch = pytest.importorskip("torch")
    path, model = vae_with_encoder
    rng = np.random.default_rng(1)
    masks = np.stack([np.pad(np.ones((h, w)), ((0, 64 - h), (0, 64 - w)))
                      for h, w in rng.integers(8, 64, size=(8, 2))]).astype(np.float32)
    mine = load_mask_encoder(path).encode(masks)
    with torch.no_grad():
        want = model.encode(torch.from_numpy(2 * masks - 1)).numpy()
    assert mine.shape == (8, 16) and (mine == want).all()
    with pytest.raises(NoMaskEncoder, match="holds no VQ-VAE encoder"):
        load_mask_encoder(DEMO_VAE)  # the demo ships the decoder only


def test_polygons_and_rle_become_seg_codes(photos, vae_with_encoder):
    path, _ = vae_with_encoder
    mask = np.zeros((100, 200), dtype=bool)
    mask[20:60, 10:40] = True  # the cat's box, filled
    rle = calls.mask_to_rle(mask)
    coco = base_coco()
    coco["annotations"][0]["segmentation"] = {"size": [100, 200], "counts": rle_string(
        calls.mask_to_rle(np.pad(np.ones((80, 50), bool), ((10, 10), (100, 50))))["counts"])}
    coco["annotations"][1]["segmentation"] = rle
    src = write(photos / "labels.json", coco)
    by_rle = C.read_coco(src, C.CocoOptions(vae=path))[0]
    coco["annotations"][1]["segmentation"] = [[10, 20, 40, 20, 40, 60, 10, 60]]
    by_polygon = C.read_coco(write(src, coco), C.CocoOptions(vae=path))[0]
    assert by_rle.prefix == "segment cat ; dog"
    parsed = parse.parse_objects(by_rle.suffix, (200, 100)).objects
    assert [o.label for o in parsed] == ["cat", "dog"] and all(len(o.seg) == 16 for o in parsed)
    want = load_mask_encoder(path).encode(C.box_crop(mask, (10, 20, 40, 60))[None])[0]
    assert list(parsed[0].seg) == want.tolist()
    # the polygon fills the same pixels (PIL includes the edge pixels), so nearly the same codes
    assert sum(a == b for a, b in zip(parse.parse_objects(by_polygon.suffix, (200, 100)).objects[0].seg,
                                      parsed[0].seg)) >= 12


def test_bad_or_missing_masks_are_named(photos, vae_with_encoder):
    path, _ = vae_with_encoder
    coco = base_coco()
    coco["annotations"][0]["segmentation"] = [[10, 20, 40, 20, 40, 60]]
    src = write(photos / "labels.json", coco)
    with pytest.raises(DataError, match=r"have no mask .*e.g. annotations\[1\]"):  # would teach it as absent
        C.read_coco(src, C.CocoOptions(vae=path))
    coco["annotations"][1]["segmentation"] = {"size": [1, 1], "counts": [1]}
    with pytest.raises(DataError, match=r"annotations\[1\]: RLE size \[1, 1\] is not the image's"):
        C.read_coco(write(src, coco), C.CocoOptions(vae=path))
    coco["annotations"][1]["segmentation"] = {"size": [100, 200], "counts": "\x7f\x7f"}
    with pytest.raises(DataError, match="compressed RLE counts are not valid"):
        C.read_coco(write(src, coco), C.CocoOptions(vae=path))


def test_masks_without_an_encoder_train_boxes_with_a_note(photos):
    coco = base_coco()
    coco["annotations"][1]["segmentation"] = [[10, 20, 40, 20, 40, 60]]
    src = write(photos / "labels.json", coco)
    notes = []
    ex = C.read_coco(src, C.CocoOptions(vae=DEMO_VAE), note=notes.append)
    assert ex[0].prefix.startswith("detect ") and "<seg" not in ex[0].suffix
    assert len(notes) == 1 and "holds no VQ-VAE encoder" in notes[0] and "boxes only" in notes[0]
    with pytest.raises(DataError, match="cannot make <seg> targets"):
        C.read_coco(src, C.CocoOptions(task="segment"))


# -- hostile files ----------------------------------------------------------------------------

def _edit(fn):
    def make():
        coco = base_coco()
        fn(coco)
        return json.dumps(coco)
    return make


HOSTILE = {
    "not json": (lambda: "{images: ", "not valid JSON"),
    "not coco": (lambda: json.dumps({"images": []}), "not a COCO detection file"),
    "deep": (lambda: "[" * 100000 + "]" * 100000, "nested too deeply"),
    "missing image keys": (_edit(lambda c: c["images"][0].pop("width")), "positive integer width"),
    "box outside": (_edit(lambda c: c["annotations"][0].update(bbox=[190, 10, 50, 80])), "lies outside"),
    "empty box": (_edit(lambda c: c["annotations"][0].update(bbox=[10, 10, 0, 5])), "empty box"),
    "nan box": (_edit(lambda c: c["annotations"][0].update(bbox=[10, 10, "x", 5])), "bbox must be"),
    "unknown image": (_edit(lambda c: c["annotations"][0].update(image_id=99)), "image_id 99 is not in images"),
    "unknown category": (_edit(lambda c: c["annotations"][0].update(category_id=3)), "category_id 3"),
    "duplicate image": (_edit(lambda c: c["images"][1].update(id=1)), "duplicate id 1"),
    "bad name": (_edit(lambda c: c["categories"][0].update(name="cat ; dog")), "must not contain ';'"),
    "wrong size": (_edit(lambda c: c["images"][0].update(width=400)), "the file says 400x100"),
    "missing file": (_edit(lambda c: c["images"][0].update(file_name="gone.png")), "image not found"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_get_one_line(case, photos, tmp_path, capsys):
    make, message = HOSTILE[case]
    src = photos / "labels.json"
    src.write_text(make())
    out = tmp_path / "run"
    argv = ["finetune", "demo", "--data", str(src), "--train", "lora", "--steps", "1", "-o", str(out), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pg-edge finetune: error:")
    assert message in err, err
    assert not out.exists()


def test_a_huge_file_is_refused_before_it_is_read(photos, monkeypatch):
    src = write(photos / "labels.json", base_coco())
    monkeypatch.setattr(C, "MAX_BYTES", 100)
    with pytest.raises(DataError, match="are refused"):
        C.read_coco(src)


def test_coco_options_on_jsonl_data_are_refused(photos, tmp_path, capsys):
    jsonl = photos / "train.jsonl"
    jsonl.write_text(json.dumps({"image": "a.png", "prefix": "caption en", "suffix": "grey"}) + "\n")
    out = tmp_path / "run"
    assert main(["finetune", "demo", "--data", str(jsonl), "--train", "lora", "--steps", "1", "-o", str(out),
                 "--images", str(photos), "--coco-prompt", "each", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--images, --coco-prompt apply to COCO data" in err and not out.exists()
