"""`pg-edge export` bundles run by the C++ example (apps/cpp) give pg_edge's greedy ids.

The C++ program is compiled once per session (`make -C apps/cpp`, objects cached in
apps/cpp/build/), against the MLX of the Python running the tests. Models are listed in MODELS:
name -> function(request) returning a model folder; add one there and every parametrized
test below covers it, the built-in demo model (8-bit, its own tokenizer ids) among them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pg_edge
import pg_edge.checkpoint.folder
from pg_edge.export import export_bundle
from pg_edge.export.bundle import fnv1a64
from pg_edge.inputs.images import preprocess_image

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "pg_edge" / "assets"
MAX_TOKENS = 10


def _converted(**spec):
    return lambda request: request.getfixturevalue("converted")(**spec)


def _quantized(version: int):
    def build(request):
        from pg_edge.quantize import quantize

        _, src = request.getfixturevalue("qsrc")(version)
        out = request.getfixturevalue("tmp_path_factory").mktemp("q4") / f"pg{version}_all4"
        quantize(src, out, "all4", probes=0)
        return out

    return build


MODELS = {
    "pg1": _converted(version=1),
    "pg2": _converted(version=2),
    # window 8 < every prompt here (16 image tokens + <bos> + prefix + "\n"): sliding layers active
    "pg2_window8": _converted(version=2, sliding_window=8),
    "pg2_window8_bf16": _converted(version=2, dtype="bfloat16", sliding_window=8),  # what convert writes
    "pg1_q4": _quantized(1),
    "pg2_q4": _quantized(2),
    "demo": lambda request: pg_edge.checkpoint.folder.resolve("demo"),  # shipped 8-bit, non-Gemma token ids
}
# (image file, prompt): a JPEG, an RGBA PNG (composited onto white), a grayscale PNG, an
# EXIF-rotated JPEG.
CASES = [
    ("cat.jpg", "caption en"),
    ("astronaut_rgba.png", "detect person ; flag"),
    ("camera_l.png", "answer en what is the man holding in his hands?"),
    # typed control-token text stays text, a typed <loc> is the location token (both sides)
    ("chelsea_orientation6.jpg", "answer en is <eos> or <image> at <loc0512>?"),
]


@pytest.fixture(scope="session")
def runner() -> Path:
    """apps/cpp/build/pg-edge-run, built (or brought up to date) once per session."""
    if shutil.which("g++") is None:
        pytest.fail("g++ is missing: `make setup` installs the packages in .ci/apt-packages.txt")
    proc = subprocess.run(["make", "-C", str(ROOT / "apps" / "cpp"), f"PYTHON={sys.executable}"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ROOT / "apps" / "cpp" / "build" / "pg-edge-run"


@pytest.fixture(scope="session")
def images(tmp_path_factory, _sample_images_cache) -> Path:
    d = tmp_path_factory.mktemp("images")
    shutil.copyfile(ASSETS / "cat.jpg", d / "cat.jpg")
    _sample_images_cache["astronaut_rgba"].save(d / "astronaut_rgba.png")
    _sample_images_cache["camera_l"].save(d / "camera_l.png")
    _sample_images_cache["chelsea_p"].save(d / "chelsea_p.png")
    _sample_images_cache["tiny_37x13"].save(d / "tiny_37x13.jpg")
    # EXIF orientations pg_edge turns upright (a rotation, a mirror, a transpose), JPEG and PNG,
    # on a non-square photo; and 16-bit grey, which pg_edge scales to 8 bits.
    chelsea = _sample_images_cache["chelsea"]
    for k, ext in ((3, "jpg"), (6, "jpg"), (8, "png"), (5, "png"), (2, "jpg")):
        exif = Image.Exif()
        exif[0x0112] = k
        chelsea.save(d / f"chelsea_orientation{k}.{ext}", exif=exif.tobytes())
    grey16 = (np.linspace(0, 65535, 120 * 90).reshape(90, 120)).astype(np.uint16)
    Image.fromarray(grey16).save(d / "grey16.png")
    return d


@pytest.fixture(scope="session")
def model(request):
    """Factory: name in MODELS -> (model folder, bundle folder), each built once."""
    built = {}

    def factory(name: str):
        if name not in built:
            folder = MODELS[name](request)
            out = request.getfixturevalue("tmp_path_factory").mktemp("bundle") / name
            built[name] = folder, export_bundle(folder, out)
        return built[name]

    return factory


def run_cpp(runner: Path, *args, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(runner), *map(str, args)], capture_output=True, text=True, timeout=120,
                          env=None if env is None else {**os.environ, **env})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def cpp_json(runner, bundle, image, prompt, *extra) -> dict:
    out = run_cpp(runner, bundle, "--image", image, "--prompt", prompt, "--max-tokens", MAX_TOKENS, "--json", *extra)
    return json.loads(out.stdout)


@pytest.mark.parametrize("name", list(MODELS))
def test_cpp_greedy_ids_equal_pg_edge(runner, model, images, name):
    folder, bundle = model(name)
    lengths = json.loads((bundle / "manifest.json").read_text())["functions"]["prefill"]["prompt_lengths"]
    pg = pg_edge.load(folder)
    used = set()
    for image, prompt in CASES:
        want = pg.generate(str(images / image), prompt, max_tokens=MAX_TOKENS)
        got = cpp_json(runner, bundle, images / image, prompt)
        assert got["tokens"] == want.tokens, (name, image, prompt)
        assert got["text"] == want.text
        assert got["finish_reason"] == want.finish_reason
        assert got["prompt_tokens"] == want.prompt_tokens
        used.add(min(p for p in lengths if p >= got["prompt_tokens"]))
    assert len(used) >= 2, "the cases should exercise more than one prefill trace"


def test_sliding_window_is_active_and_matches(runner, model, images):
    """Same weights with and without a short window: the window changes the ids, and the C++
    runner follows pg_edge in both."""
    _, plain = model("pg2")
    folder, windowed = model("pg2_window8")
    manifest = json.loads((windowed / "manifest.json").read_text())
    assert manifest["model"]["sliding_windows"] == [8, None, 8]
    outs = [(cpp_json(runner, plain, images / im, p)["tokens"], cpp_json(runner, windowed, images / im, p))
            for im, p in CASES]
    assert all(w["prompt_tokens"] > manifest["prompt"]["num_image_tokens"] + 2 > 8 for _, w in outs)
    assert any(a != w["tokens"] for a, w in outs), "the window never changed the output"


def test_pg_edge_run_json_and_the_cpp_runner_agree(runner, model, images):
    folder, bundle = model("pg2_window8")
    cli = subprocess.run([sys.executable, "-m", "pg_edge.cli", "run", str(folder), "--image", str(images / "cat.jpg"),
                          "--prompt", "caption en", "--max-tokens", str(MAX_TOKENS), "--json"],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    want = json.loads(cli.stdout)
    got = cpp_json(runner, bundle, images / "cat.jpg", "caption en")
    assert got["tokens"] == want["tokens"] and got["text"] == want["text"]
    assert set(got["timings"]) >= {"vision_s", "prefill_s", "generation_s", "generation_tps"}


def test_cpp_preprocessing_is_pillows_to_the_bit(runner, model, images):
    _, bundle = model("pg1")
    size = json.loads((bundle / "manifest.json").read_text())["image"]["size"]
    for f in sorted(images.iterdir()):
        run_cpp(runner, bundle, "--image", f, "--dump-pixels", images.parent / "px.bin")
        got = np.fromfile(images.parent / "px.bin", np.float32).reshape(size, size, 3)
        np.testing.assert_array_equal(got, preprocess_image(f, size), err_msg=f.name)


@pytest.mark.parametrize("name", ["pg1", "pg2_q4"])
def test_bundle_stores_the_weights_once(model, name):
    folder, bundle = model(name)
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    graphs = sum(f.stat().st_size for f in bundle.glob("*.mlxfn"))
    side = sum((bundle / n).stat().st_size for n in ("tokenizer.model", "manifest.json"))
    total = sum(f.stat().st_size for f in bundle.iterdir())
    # Graphs hold no weights: their size is the op count (bigger with the CPU backend's
    # dequantize-then-matmul prefill, pg_edge/cpu/products.py), ~0.5 MB here against 10-66 MB of
    # weights, ~2.5 MB for a 3B model against GBs.
    assert graphs < 0.10 * weights
    assert abs(total - (weights + graphs + side)) < 0.03 * (weights + graphs), (total, weights, graphs)


def test_detect_prints_the_boxes_pg_edge_parses(runner, model, images):
    from pg_edge.tasks.parse import parse_objects

    _, bundle = model("pg1")
    text = ("<loc0100><loc0200><loc0512><loc1023> cat ; <loc0001><loc0002><loc0003> half ; "
            "<loc0010><loc0020><loc0900><loc0800>" + "".join(f"<seg{i:03d}>" for i in range(16)) + " big  dog ; "
            "<loc0500><loc0500><loc0400><loc0600> empty")
    image = images / "camera_l.png"
    got = json.loads(run_cpp(runner, bundle, "--image", image, "--parse", text, "--json").stdout)
    want = parse_objects(text, (512, 512))
    assert [(o["label"], o["loc"]) for o in got["objects"]] == [(o.label, list(o.loc)) for o in want.objects]
    np.testing.assert_allclose([o["box"] for o in got["objects"]], [o.box for o in want.objects])
    assert [o["seg"] or None for o in got["objects"]] == [list(o.seg) if o.seg else None for o in want.objects]
    assert [s["reason"] for s in got["skipped"]] == [s.reason for s in want.skipped]
    # --detect on a generation gives the objects of its own text.
    out = cpp_json(runner, bundle, images / "cat.jpg", "detect cat", "--detect")
    assert "objects" in out and "skipped" in out


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pg-edge-run: error: "), proc.stderr
    return lines[0]


def test_bad_bundles_give_one_line_errors(runner, model, images, tmp_path):
    folder, good = model("pg1")
    _, other = model("pg2")
    args = ["--image", images / "cat.jpg", "--prompt", "caption en", "--max-tokens", 2]

    def broken(name, change) -> str:
        b = tmp_path / name
        shutil.copytree(good, b)
        change(b)
        return _one_line_error(run_cpp(runner, b, *args, check=False))

    assert "not a pg-edge bundle" in _one_line_error(run_cpp(runner, folder, *args, check=False))

    def flip(b):
        data = bytearray((b / "decode.mlxfn").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (b / "decode.mlxfn").write_bytes(bytes(data))

    assert "decode.mlxfn" in broken("flipped", flip) and "damaged" in broken("flipped2", flip)
    assert "damaged" in broken("truncated", lambda b: (b / "prefill.mlxfn").write_bytes(
        (b / "prefill.mlxfn").read_bytes()[:1000]))
    assert "another bundle" in broken("graph_of_pg2", lambda b: shutil.copyfile(other / "encode.mlxfn", b / "encode.mlxfn"))
    assert "another bundle" in broken("weights_of_pg2", lambda b: shutil.copyfile(
        other / "weights.safetensors", b / "weights.safetensors"))

    def rewrite_checksum(b):
        """A damaged graph whose manifest entry was updated to match: MLX's reader must fail cleanly."""
        f = b / "prefill.mlxfn"
        data = bytearray(f.read_bytes())
        for i in range(200, len(data), 997):
            data[i] ^= 0x5A
        f.write_bytes(bytes(data))
        m = json.loads((b / "manifest.json").read_text())
        m["functions"]["prefill"].update(fnv1a64=fnv1a64(f), bytes=len(data))
        (b / "manifest.json").write_text(json.dumps(m))

    assert "prefill.mlxfn" in broken("garbled", rewrite_checksum)
    assert "truncated or corrupt" in broken("short_weights", lambda b: (b / "weights.safetensors").write_bytes(
        (b / "weights.safetensors").read_bytes()[:100_000]))
    bad_image = tmp_path / "not_an_image.png"
    bad_image.write_bytes(b"hello")
    assert "not_an_image.png" in _one_line_error(run_cpp(runner, good, "--image", bad_image, "--prompt", "x",
                                                          check=False))
    over = _one_line_error(run_cpp(runner, good, "--image", images / "cat.jpg", "--prompt", "x", check=False,
                                   env={"PG_EDGE_MAX_IMAGE_PIXELS": "1000"}))
    assert "past the limit of 1000" in over  # pg_edge's pixel limit, from the header
    long_prompt = "answer en " + " ".join(["word"] * 80)
    assert "--prompt-tokens" in _one_line_error(run_cpp(runner, good, "--image", images / "cat.jpg", "--prompt",
                                                         long_prompt, check=False))


def test_export_refuses_an_existing_output_and_writes_nothing_on_error(model, tmp_path, capsys):
    from pg_edge.cli import main
    from pg_edge.errors import PgEdgeError

    folder, bundle = model("pg1")
    assert main(["export", str(folder), "-o", str(bundle)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists; pass --force" in err[0]
    with pytest.raises(PgEdgeError, match="--prompt-tokens"):
        export_bundle(folder, tmp_path / "x", prompt_tokens=2)
    no_sp = tmp_path / "no_sp"
    shutil.copytree(folder, no_sp)
    (no_sp / "tokenizer.model").unlink()
    with pytest.raises(PgEdgeError, match="tokenizer.model"):
        export_bundle(no_sp, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


# -- issue 23 items 9-11: a runner that checks its manifest and its files; export's bounds ------
def _limited():
    """Child processes: at most 4 GB of address space (a runaway allocation fails, not the machine)."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def _run_limited(runner, bundle, *args, timeout=60):
    return subprocess.run([str(runner), str(bundle), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_limited)


def _edited(good, tmp_path, name, change):
    b = tmp_path / name
    shutil.copytree(good, b)
    m = json.loads((b / "manifest.json").read_text())
    change(m, b)
    (b / "manifest.json").write_text(json.dumps(m))
    return b


MANIFEST_EDITS = {
    # item 9: sizes past what the graphs were traced for, ids past the vocabulary
    "max_context doubled": (lambda m, b: m["cache"].update(max_context=m["cache"]["max_context"] * 2), "max_context"),
    "max_context and cache shape": (lambda m, b: (m["cache"].update(max_context=999),
                                                  m["cache"]["shape"].__setitem__(2, 999)), "max_context"),
    "image size 0": (lambda m, b: m["image"].update(size=0), "image_size"),
    "image size 40000": (lambda m, b: m["image"].update(size=40000), "image_size"),
    "bos past the vocabulary": (lambda m, b: m["tokenizer"].update(bos_id=10**6), "bos_id"),
    "pad negative": (lambda m, b: m["tokenizer"].update(pad_id=-1), "pad_id"),
    "image id past": (lambda m, b: m["tokenizer"].update(image_id=300_000), "image_id"),
    "newline past": (lambda m, b: m["tokenizer"].update(newline_ids=[10**9]), "newline_ids"),
    "eos past": (lambda m, b: m["tokenizer"].update(eos_id=2**31 - 1), "eos_id"),
    "vocab past the embedding": (lambda m, b: m["tokenizer"].update(vocab_size=10**7), "vocab_size"),
    "id too big for int": (lambda m, b: m["tokenizer"].update(bos_id=2**40), "must be an integer (32-bit)"),
    "prompt lengths": (lambda m, b: m["functions"]["prefill"].update(
        prompt_lengths=[x + 1 for x in m["functions"]["prefill"]["prompt_lengths"]]), "prompt_lengths"),
    "prompt lengths and max": (lambda m, b: (m["prompt"].update(max_prompt_tokens=5000),
                                             m["functions"]["prefill"]["prompt_lengths"].append(5000)), "max_prompt_tokens"),
    # item 10: files outside the bundle, devices, FIFOs
    "tokenizer ..": (lambda m, b: m["tokenizer"].update(file="../tokenizer.model"), "not a plain file name"),
    "tokenizer /dev/zero": (lambda m, b: m["tokenizer"].update(file="/dev/zero"), "not a plain file name"),
    "weights path": (lambda m, b: m["weights"].update(file="../../weights.safetensors"), "not a plain file name"),
    "graph path": (lambda m, b: m["functions"]["encode"].update(file="/etc/passwd"), "not a plain file name"),
    "file name a number": (lambda m, b: m["tokenizer"].update(file=7), "must be a file name"),
    "tokenizer a device": (lambda m, b: ((b / "tokenizer.model").unlink(),
                                         (b / "tokenizer.model").symlink_to("/dev/zero")), "not a regular file"),
    "tokenizer a FIFO": (lambda m, b: ((b / "tokenizer.model").unlink(), os.mkfifo(b / "tokenizer.model")),
                         "not a regular file"),
    "tokenizer outside": (lambda m, b: ((b / "tokenizer.model").rename(b.parent / f"{b.name}.sp"),
                                        (b / "tokenizer.model").symlink_to(b.parent / f"{b.name}.sp")),
                          "leads out of the bundle"),
    "manifest a FIFO": (lambda m, b: None, "not a regular file"),  # replaced below
}


@pytest.mark.parametrize("case", list(MANIFEST_EDITS))
def test_edited_manifests_and_files_are_refused_in_one_line(runner, model, images, tmp_path, case):
    _, good = model("pg1")
    change, words = MANIFEST_EDITS[case]
    b = _edited(good, tmp_path, "b", change)
    if case == "manifest a FIFO":
        (b / "manifest.json").unlink()
        os.mkfifo(b / "manifest.json")
    proc = _run_limited(runner, b, "--image", images / "cat.jpg", "--prompt", "caption en", "--max-tokens", 2)
    line = _one_line_error(proc)
    assert words in line and len(line) < 500, line


def test_images_that_are_no_regular_files_are_refused(runner, model, tmp_path):
    _, good = model("pg1")
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    for image in (fifo, "/dev/zero", tmp_path):
        line = _one_line_error(_run_limited(runner, good, "--image", image, "--prompt", "caption en", timeout=30))
        assert "not a regular file" in line, line


def test_mutated_manifests_never_crash_the_runner(runner, model, images, tmp_path):
    """Random edits of the manifest's numbers, strings and lists (seeded, 60 cases, each within
    60 s and 4 GB): the runner answers (exit 0) or refuses in one line (exit 2), never a signal."""
    import random
    import time

    _, good = model("pg1")
    base = json.loads((good / "manifest.json").read_text())
    rng = random.Random(23)

    def leaves(x, path=()):
        if isinstance(x, dict):
            for k, v in x.items():
                yield from leaves(v, path + (k,))
        elif isinstance(x, list) and x and not isinstance(x[0], (dict, list)):
            yield path, x
            for i, v in enumerate(x):
                yield from leaves(v, path + (i,))
        else:
            yield path, x

    spots = [(p, v) for p, v in leaves(base) if "tensors" not in p or rng.random() < 0.02]
    values = [0, -1, 1, 2**31 - 1, 2**31, -(2**31) - 1, 10**12, 1.5, "", "x", None, True, [], {}, [0], "../x"]
    t0 = time.monotonic()
    outcomes = {0: 0, 2: 0}
    for n in range(60):
        path, old = rng.choice(spots)
        new = rng.choice(values + ([old * 2, old + 1, -old] if isinstance(old, int) and not isinstance(old, bool) else []))
        m = json.loads(json.dumps(base))
        target = m
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = new
        b = tmp_path / f"m{n}"
        shutil.copytree(good, b)
        (b / "manifest.json").write_text(json.dumps(m))
        proc = _run_limited(runner, b, "--image", images / "cat.jpg", "--prompt", "caption en", "--max-tokens", 3)
        assert proc.returncode in (0, 2), (path, new, proc.returncode, proc.stderr[-500:])
        if proc.returncode == 2:
            _one_line_error(proc)
        outcomes[proc.returncode] += 1
        shutil.rmtree(b)
    assert outcomes[2] > 10 and time.monotonic() - t0 < 600, outcomes


@pytest.mark.parametrize("flag", ["--max-tokens", "--prompt-tokens"])
def test_export_bounds_its_sizes_by_the_context(converted, tmp_path, capsys, flag):
    from pg_edge.cli import main

    out = tmp_path / "bundle"
    assert main(["export", str(converted(version=1)), "-o", str(out), flag, "1000000000", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "past the model's context of 8192 tokens" in err[0], err
    assert not out.exists() and not list(tmp_path.iterdir())
