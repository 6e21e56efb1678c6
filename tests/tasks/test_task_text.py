"""Task prompts and the detection / segmentation output parser."""

import numpy as np
import pytest

from pg_edge.tasks import parse, prompts
from pg_edge.errors import PgEdgeError
from pg_edge.tasks.parse import encode_box, parse_objects


def loc(*bins):
    return "".join(f"<loc{b:04d}>" for b in bins)


def seg(*codes):
    return "".join(f"<seg{c:03d}>" for c in codes)


SEG16 = seg(*range(0, 128, 8))  # 16 codes


# --- prompts -----------------------------------------------------------------------------------

def test_prompt_forms():
    assert prompts.caption() == "caption en"
    assert prompts.caption("es") == "caption es"
    assert prompts.cap("de") == "cap de"
    assert prompts.describe("pt-BR") == "describe pt-BR"
    assert prompts.ocr() == "ocr"
    assert prompts.answer("  what is   this? ", "fr") == "answer fr what is this?"
    assert prompts.question("a red car") == "question en a red car"
    assert prompts.detect("cat") == "detect cat"
    assert prompts.detect(["cat", "black dog"]) == "detect cat ; black dog"
    assert prompts.detect("cat;dog") == "detect cat ; dog"  # typed on a command line
    assert prompts.segment("cat ; dog") == "segment cat ; dog"
    assert prompts.answer("why?", lang="it") == "answer it why?"
    assert prompts.segment(["car"]) == "segment car"


@pytest.mark.parametrize("call,match", [
    (lambda: prompts.caption("english"), "language"),
    (lambda: prompts.caption(""), "language"),
    (lambda: prompts.answer("line one\nline two"), "one line"),
    (lambda: prompts.answer("   "), "empty"),
    (lambda: prompts.question("<loc0001>"), "special-token"),
    (lambda: prompts.detect(["cat", ""]), "empty"),
    (lambda: prompts.detect(["cat;dog"]), "separator"),
    (lambda: prompts.detect([]), "at least one"),
    (lambda: prompts.segment("a <image> b"), "special-token"),
])
def test_prompt_validation(call, match):
    with pytest.raises(PgEdgeError, match=match):
        call()


# --- parsing -----------------------------------------------------------------------------------

def test_single_detection_square():
    r = parse_objects(loc(0, 0, 1023, 1023) + " cat", (224, 224))
    assert r.skipped == []
    (obj,) = r.objects
    assert obj.label == "cat" and obj.seg is None and obj.mask is None
    assert obj.loc == (0, 0, 1023, 1023)
    assert obj.box == (0.0, 0.0, 224.0, 224.0)  # /1023: the last bin reaches the edge


def test_boxes_scale_to_original_non_square_image():
    # (y1, x1, y2, x2) bins; image 640 wide, 480 high.
    r = parse_objects(loc(102, 205, 511, 818) + " dog", (640, 480))
    (obj,) = r.objects
    x1, y1, x2, y2 = obj.box
    assert x1 == pytest.approx(205 / 1023 * 640) and x2 == pytest.approx(818 / 1023 * 640)
    assert y1 == pytest.approx(102 / 1023 * 480) and y2 == pytest.approx(511 / 1023 * 480)


def test_several_objects_with_and_without_masks():
    text = (loc(10, 20, 300, 400) + " cat ; " + loc(500, 500, 900, 1000) + SEG16 + " black dog"
            + " ; " + loc(1, 2, 3, 4) + " cat")
    r = parse_objects(text, (100, 200))
    assert [o.label for o in r.objects] == ["cat", "black dog", "cat"]
    assert r.objects[0].seg is None
    assert r.objects[1].seg == tuple(range(0, 128, 8))
    assert r.skipped == []


def test_segmentation_without_label_and_spaced_tokens():
    # Fine-tuned refcoco-style outputs carry no label; some detokenizers add spaces.
    text = " ".join(f"<loc{b:04d}>" for b in (1, 2, 30, 40)) + " " + SEG16
    (obj,) = parse_objects(text, (64, 64)).objects
    assert obj.label == "" and len(obj.seg) == 16


@pytest.mark.parametrize("bad,reason", [
    (loc(1, 2, 3) + " cat", "expected 4 <loc> tokens, got 3"),
    (loc(1, 2, 3, 4, 5) + " cat", "expected 4 <loc> tokens, got 5"),
    (loc(300, 10, 300, 20) + " cat", "empty box"),  # y2 == y1
    (loc(10, 50, 20, 40) + " cat", "empty box"),  # x2 < x1
    (loc(1, 2, 3, 4) + seg(*range(7)) + " cat", "7 of 16"),  # truncated mask
    (loc(1, 2, 3, 4) + seg(*range(1)), "1 of 16"),
    (loc(1, 2, 3, 4) + seg(*range(15)), "15 of 16"),
    (loc(1, 2, 3, 1024) + " cat", "out of range"),
    (loc(1, 2, 3, 4) + seg(*range(15), 128) + " cat", "out of range"),
    (loc(1, 2, 3, 4) + " cat " + SEG16, "tokens after the label"),
    ("I see a cat", "stray text"),
    (SEG16 + " cat", "no <loc> tokens"),
])
def test_malformed_pieces_are_skipped_with_reason(bad, reason):
    good = loc(100, 100, 200, 200) + " dog"
    r = parse_objects(f"{good} ; {bad} ; {good}", (320, 240))
    assert [o.label for o in r.objects] == ["dog", "dog"]
    assert len(r.skipped) == 1, r.skipped
    assert reason in r.skipped[0].reason
    assert r.skipped[0].text.startswith(bad.split(" ")[0][:6])


def test_stray_text_before_objects_and_missing_separator():
    text = "Sure! " + loc(1, 2, 30, 40) + " cat " + loc(5, 6, 70, 80) + " dog"
    r = parse_objects(text, (50, 50))
    assert [o.label for o in r.objects] == ["cat", "dog"]
    assert [(s.text, "stray text" in s.reason) for s in r.skipped] == [("Sure!", True)]


def test_prompt_echo_eos_and_trailing_text():
    body = loc(10, 20, 300, 400) + " cat ; " + loc(500, 500, 900, 1000) + " dog"
    want = ["cat", "dog"]
    size = (300, 200)
    for text, prompt in [
        ("<bos>detect cat ; dog\n" + body, "detect cat ; dog"),  # echo, prompt given
        ("detect cat ; dog\n" + body, None),  # echo recognised without the prompt
        ("<image><image><bos>detect cat ; dog\n" + body + "<eos>", None),
        (body + "<eos>" + loc(1, 1, 9, 9) + " ghost", None),  # text after eos is noise
        (body + " ; ", None),  # trailing separator
        (body + "</s>", None),
    ]:
        r = parse_objects(text, size, prompt=prompt)
        assert [o.label for o in r.objects] == want, text
        assert r.skipped == [], (text, r.skipped)


def test_clean_output_for_text_tasks():
    assert parse.clean_output("caption en\na cat on a mat<eos>") == "a cat on a mat"
    assert parse.clean_output("answer en why?\nbecause<eos>", "answer en why?") == "because"
    assert parse.clean_output("ocr\nHELLO") == "HELLO"
    assert parse.clean_output("a dog\nand a cat") == "a dog\nand a cat"  # no echo: untouched


def test_empty_and_garbage_never_crash():
    for text in ["", "<eos>", ";;;", "<loc>", "<loc99999999999>" * 4, "<seg1>" * 40, "\n\n"]:
        r = parse_objects(text, (10, 10))
        assert r.objects == [] or all(o.box[2] > o.box[0] for o in r.objects)
    with pytest.raises(PgEdgeError, match="image_size"):
        parse_objects("", (0, 10))


def test_encode_decode_round_trip_within_one_bin():
    rng = np.random.default_rng(0)
    for width, height in [(224, 224), (640, 480), (37, 1000)]:
        for _ in range(50):
            x1, x2 = sorted(rng.uniform(0, width, 2))
            y1, y2 = sorted(rng.uniform(0, height, 2))
            if x2 - x1 < 2 * width / 1023 or y2 - y1 < 2 * height / 1023:
                continue  # would collapse into one bin
            (obj,) = parse_objects(encode_box((x1, y1, x2, y2), (width, height)) + " thing",
                                   (width, height)).objects
            bin_px = np.array([width, height, width, height]) / 1023
            err_bins = np.abs(np.subtract(obj.box, (x1, y1, x2, y2))) / bin_px
            assert err_bins.max() <= 0.5 + 1e-9  # half a bin: round-to-nearest, well within one
    assert encode_box((0, 0, 640, 480), (640, 480)) == loc(0, 0, 1023, 1023)
    assert encode_box((-5, -5, 700, 900), (640, 480)) == loc(0, 0, 1023, 1023)  # clipped
