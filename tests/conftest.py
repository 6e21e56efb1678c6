"""Shared pytest fixtures: a tiny PaliGemma tokenizer, tiny HF checkpoints, sample images.

Fixtures (all offline; nothing here touches the network):

    tokenizer_dir            Path  folder with tokenizer.model + HF tokenizer/processor files
    hf_checkpoint            factory (version=1, image_size=28, layout="classic",
                             top_hidden_mismatch=False, sliding_window=None) -> Path of a complete
                             HF PaliGemma folder (see fixtures/checkpoints.py)
    sample_images_by_name    dict[str, PIL.Image]  real photos + RGBA / L / P / tiny non-square
    sample_images            list[PIL.Image]       the same, in a fixed order

Builds are cached under the pytest cache (`.pytest_cache/d/pg_edge_fixtures/<key>/<name>`),
where <key> hashes the fixture builder sources and the versions of the libraries that shape the
files, so editing a builder or upgrading transformers rebuilds. Each build happens in a temp dir
that is renamed into place only when complete, so an interrupted run never leaves a broken cache.
"""

from __future__ import annotations

import os

# Before anything imports huggingface_hub/transformers: never touch the network in tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from tokenizers

import hashlib
import shutil
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Callable

import sys

import pytest

# Test modules import the helpers in tests/helpers/ (`hf_helpers`, ...) as top-level modules
# (tests/ has no __init__.py), and the checkpoint builders from fixtures/ at the repository root
# (shared with the bench scripts, which must not import tests/); make both hold under any pytest
# import mode, not only the default "prepend".
for _path in (Path(__file__).parent / "helpers", Path(__file__).resolve().parents[1]):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from fixtures.checkpoints import FixtureSpec, make_hf_checkpoint  # noqa: E402
from fixtures.tokenizer import build_tokenizer  # noqa: E402

_FIXTURE_DIR = Path(__file__).resolve().parents[1] / "fixtures"
_STALE_AFTER_S = 3600  # other keys' builds older than this are removed (may belong to a live run)


def _cache_key() -> str:
    """Hash of the builder sources + library versions: any change gives a fresh cache dir."""
    h = hashlib.sha256()
    for f in sorted(_FIXTURE_DIR.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    for dist in ("transformers", "sentencepiece", "tokenizers", "safetensors", "torch"):
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=none".encode())
    return h.hexdigest()[:16]


def _prune_stale(root: Path, keep: str) -> None:
    """Delete builds of other cache keys (old builder versions) not touched for an hour."""
    now = time.time()
    for d in root.iterdir():
        if d.name == keep or not d.is_dir():
            continue
        try:
            if now - d.stat().st_mtime > _STALE_AFTER_S:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _atomic_build(final: Path, build: Callable[[Path], object]) -> Path:
    """Return `final`, building it first via `build(tmp)` + rename if it does not exist yet.

    rename(2) of a directory is atomic on one filesystem: readers see nothing or a complete
    folder. If a concurrent run (e.g. xdist worker) finished first, our copy is discarded.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@pytest.fixture(scope="session")
def fixture_cache_root(request) -> Path:
    """`.pytest_cache/d/pg_edge_fixtures/<key>`: where this run's fixtures live."""
    base = Path(request.config.cache.mkdir("pg_edge_fixtures"))
    key = _cache_key()
    _prune_stale(base, key)
    root = base / key
    root.mkdir(parents=True, exist_ok=True)
    os.utime(root)  # mark as live for _prune_stale of concurrent runs with other keys
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(fixture_cache_root) -> Path:
    """Folder with the tiny PaliGemma-layout tokenizer (tokenizer.model + HF files)."""
    return _atomic_build(fixture_cache_root / "tokenizer", build_tokenizer)


@pytest.fixture(scope="session")
def hf_checkpoint(fixture_cache_root, tokenizer_dir):
    """Factory: `hf_checkpoint(version=1, image_size=28, layout="classic", ...) -> Path`.

    Each distinct spec is built once per cache key; repeated calls return the same folder.
    Treat the folder as read-only (copy it with shutil.copytree before modifying).
    """
    built: dict[FixtureSpec, Path] = {}

    def factory(version: int = 1, image_size: int = 28, layout: str = "classic",
                top_hidden_mismatch: bool = False, sliding_window: int | None = None,
                seed: int = 0) -> Path:
        spec = FixtureSpec(version=version, image_size=image_size, layout=layout,
                           top_hidden_mismatch=top_hidden_mismatch, sliding_window=sliding_window, seed=seed)
        if spec not in built:
            built[spec] = _atomic_build(fixture_cache_root / spec.name,
                                        lambda tmp: make_hf_checkpoint(tmp, spec, tokenizer_dir))
        return built[spec]

    return factory


def _load_sample_images() -> dict:
    """Real photos shipped inside the scikit-image wheel (no pooch download) + odd modes/sizes."""
    import numpy as np
    from PIL import Image
    from skimage import data

    astronaut = Image.fromarray(data.astronaut())  # RGB 512x512
    chelsea = Image.fromarray(data.chelsea())  # RGB 451x300 (landscape)
    coffee = Image.fromarray(data.coffee())  # RGB 600x400
    # RGBA with real transparency (alpha ramps 0 -> 255 left to right): transformers composites
    # RGBA onto white before dropping alpha, so a plain convert("RGB") gives different pixels.
    rgba = astronaut.convert("RGBA")
    ramp = np.tile(np.linspace(0, 255, astronaut.width).astype(np.uint8), (astronaut.height, 1))
    rgba.putalpha(Image.fromarray(ramp))
    images = {
        "astronaut": astronaut,
        "chelsea": chelsea,
        # portrait (400 wide x 600 high), so both aspect ratios are exercised
        "coffee_portrait": coffee.transpose(Image.Transpose.ROTATE_90),
        "astronaut_rgba": rgba,
        "camera_l": Image.fromarray(data.camera()),  # grayscale "L" 512x512
        "chelsea_p": chelsea.quantize(colors=64),  # palette "P"
        # tiny, strongly non-square: smaller than the 28px model input on one side
        "tiny_37x13": astronaut.crop((200, 100, 237, 113)),
    }
    # Guard against a scikit-image release changing what its data loaders return.
    modes = {k: v.mode for k, v in images.items()}
    assert modes == {"astronaut": "RGB", "chelsea": "RGB", "coffee_portrait": "RGB", "astronaut_rgba": "RGBA",
                     "camera_l": "L", "chelsea_p": "P", "tiny_37x13": "RGB"}, modes
    assert np.asarray(images["astronaut_rgba"])[..., 3].min() < 255  # some pixels really are transparent
    return images


@pytest.fixture(scope="session")
def _sample_images_cache() -> dict:
    return _load_sample_images()


@pytest.fixture
def sample_images_by_name(_sample_images_cache) -> dict:
    """Fresh copies (tests may mutate them) of the sample images, keyed by name."""
    return {k: v.copy() for k, v in _sample_images_cache.items()}


@pytest.fixture
def sample_images(sample_images_by_name) -> list:
    """[astronaut, chelsea, coffee_portrait, astronaut_rgba, camera_l, chelsea_p, tiny_37x13]."""
    return list(sample_images_by_name.values())


@pytest.fixture(scope="session")
def converted(tmp_path_factory, hf_checkpoint):
    """Factory: `converted(version=1, dtype="float32", **hf_spec) -> Path` of a pg_edge converted
    folder, made by `pg_edge.convert.hf.convert_hf` from the matching `hf_checkpoint`. float32 by
    default so parity tests compare at full precision. Treat it as read-only.
    Built fresh each session (not cached across runs): it must reflect the current converter."""
    from pg_edge.convert.hf import convert_hf

    built: dict = {}

    def factory(version: int = 1, dtype: str = "float32", **spec) -> Path:
        key = (version, dtype, tuple(sorted(spec.items())))
        if key not in built:
            src = hf_checkpoint(version=version, **spec)
            out = tmp_path_factory.mktemp("converted") / f"{dtype}_{src.name}"
            built[key] = convert_hf(src, out, dtype=dtype, quiet=True)
        return built[key]

    return factory


@pytest.fixture(scope="session")
def qsrc(tmp_path_factory, tokenizer_dir):
    """Factory: version -> (HF folder, float32 converted folder) of the quantizable fixture
    (widths that divide the group sizes; see fixtures/quantizable.py)."""
    from pg_edge.convert.hf import convert_hf
    from fixtures.quantizable import make_quantizable_checkpoint

    built = {}

    def factory(version: int = 1) -> tuple[Path, Path]:
        if version not in built:
            root = tmp_path_factory.mktemp(f"quant_pg{version}")
            hf = make_quantizable_checkpoint(root / "hf", tokenizer_dir, version=version)
            built[version] = hf, convert_hf(hf, root / "float32", dtype="float32", quiet=True)
        return built[version]

    return factory
