"""Tokenizer and processor files for a folder converted from a checkpoint that has none
(big_vision .npz files ship weights only; the tokenizer is big_vision's separate
`paligemma_tokenizer.model`, the same SentencePiece model as the hub's `tokenizer.model`).

Written, so that pg_edge, mlx-vlm and transformers read the folder as they read a hub one:
    tokenizer.model            copied
    added_tokens.json          {"<image>": 257152}
    special_tokens_map.json    bos / eos / pad / unk, <image> as additional special token
    tokenizer_config.json      GemmaTokenizer, PaliGemmaProcessor
    preprocessor_config.json   SiglipImageProcessor: square resize (bicubic), [-1, 1], N tokens
    generation_config.json     bos 2, eos 1, pad 0
tokenizer.json (the fast tokenizer) is not generated: transformers builds it from
tokenizer.model on first load. When `--tokenizer` names a folder, its tokenizer files are
copied instead of the generated ones.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from pg_edge.model.config import IMAGE_TOKEN_INDEX
from pg_edge.errors import CheckpointError
from pg_edge.inputs.tokenizer import Tokenizer

TOKENIZER_NAMES = ("tokenizer.model", "paligemma_tokenizer.model")
FOLDER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def find_tokenizer(checkpoint: Path, tokenizer: str | Path | None) -> tuple[Path, Path | None]:
    """(the SentencePiece model, the folder it came from when one was given)."""
    if tokenizer is not None:
        p = Path(tokenizer).expanduser()
        if p.is_dir():
            for name in TOKENIZER_NAMES:
                if (p / name).is_file():
                    return p / name, p
            raise CheckpointError(f"no {' or '.join(TOKENIZER_NAMES)} in {p}")
        if not p.is_file():
            raise CheckpointError(f"tokenizer not found: {p}")
        return p, None
    for name in TOKENIZER_NAMES:
        if (checkpoint.parent / name).is_file():
            return checkpoint.parent / name, None
    raise CheckpointError(
        f"no tokenizer beside {checkpoint.name}: pass --tokenizer PATH (big_vision's "
        f"paligemma_tokenizer.model or a hub tokenizer.model), or put tokenizer.model next to it")


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def generated_files(image_size: int, num_image_tokens: int) -> dict[str, dict]:
    """File name -> JSON content of the HF tokenizer/processor files."""
    specials = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", IMAGE_TOKEN_INDEX: "<image>"}
    return {
        "added_tokens.json": {"<image>": IMAGE_TOKEN_INDEX},
        "special_tokens_map.json": {
            "additional_special_tokens": [_special("<image>")], "bos_token": _special("<bos>"),
            "eos_token": _special("<eos>"), "pad_token": _special("<pad>"), "unk_token": _special("<unk>")},
        "tokenizer_config.json": {
            "add_bos_token": True, "add_eos_token": False, "additional_special_tokens": ["<image>"],
            "added_tokens_decoder": {str(i): {**_special(c), "special": True} for i, c in specials.items()},
            "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
            "clean_up_tokenization_spaces": False, "model_max_length": 1000000000000000019884624838656,
            "processor_class": "PaliGemmaProcessor", "tokenizer_class": "GemmaTokenizer",
            "sp_model_kwargs": {}, "spaces_between_special_tokens": False},
        "preprocessor_config.json": {
            "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "image_processor_type": "SiglipImageProcessor", "image_seq_length": num_image_tokens,
            "processor_class": "PaliGemmaProcessor", "resample": 3, "rescale_factor": 1 / 255,
            "size": {"height": image_size, "width": image_size}},
        "generation_config.json": {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0},
    }


@contextlib.contextmanager
def tokenizer_files(checkpoint: Path, tokenizer: str | Path | None, config: dict) -> Iterator[dict[str, Path]]:
    """Yield {name: path} of the side files (in a temporary folder, removed afterwards), after
    checking that the tokenizer loads and fits the model's vocabulary."""
    model, folder = find_tokenizer(checkpoint, tokenizer)
    vision = config["vision_config"]
    with tempfile.TemporaryDirectory(prefix="pg-edge-tok-") as tmp:
        tmp = Path(tmp)
        shutil.copyfile(model, tmp / "tokenizer.model")
        for name, content in generated_files(vision["image_size"], vision["num_image_tokens"]).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        for name in FOLDER_FILES if folder is not None else ():
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)
        tok = Tokenizer(tmp)
        if tok.vocab_size != IMAGE_TOKEN_INDEX or tok.image_id != IMAGE_TOKEN_INDEX:
            raise CheckpointError(
                f"tokenizer {model} has {tok.vocab_size} pieces and <image> = {tok.image_id}; a "
                f"PaliGemma tokenizer has {IMAGE_TOKEN_INDEX} pieces and <image> = {IMAGE_TOKEN_INDEX}")
        yield {f.name: f for f in sorted(tmp.iterdir())}
