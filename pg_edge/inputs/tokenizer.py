"""PaliGemma's tokenizer: SentencePiece `tokenizer.model`, or `tokenizer.json` where a folder
has only that (transformers 5 and recent mlx-vlm conversions no longer write the .model).

Special ids (bos, eos, pad, `<image>`, `<loc0000>`, `<seg000>`) are read from the files, never
hard-coded. The vocabulary the model may emit is the SentencePiece vocabulary: 257152 ids for
the official checkpoints (Gemma's 256000 + 1024 `<locNNNN>` + 128 `<segNNN>`); `<image>` and the
HF embedding's padding rows lie beyond it.

`tokenizers` (HF's tokenizer library) is used only for the tokenizer.json fallback; it comes
with mlx-lm, which depends on transformers.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..errors import CheckpointError, PgEdgeError
from ..checkpoint.safetensors_check import read_json
from .checks import check_text


class _SentencePiece:
    def __init__(self, path: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as err:
            raise CheckpointError(f"cannot read tokenizer {path}: {err}") from None
        self.size = self.sp.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.Encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.sp.Decode(ids)

    def token_id(self, piece: str) -> int | None:
        i = self.sp.PieceToId(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.IdToPiece(i) else i

    def piece(self, i: int) -> str:
        return self.sp.IdToPiece(i)


class _TokenizerJson:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as err:  # the Rust library raises plain Exception on bad files
            raise CheckpointError(f"cannot read tokenizer {path}: {str(err)[:200]}") from None
        # User text never becomes a special added token (<image>, <bos>, <eos>, <pad>...): with
        # this flag they are encoded as plain text, as SentencePiece does for its control pieces.
        self.tok.encode_special_tokens = True
        # Like SentencePiece's size: the base vocabulary plus loc/seg, without `<image>`.
        image = self.tok.token_to_id("<image>")
        self.size = image if image is not None else self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def piece(self, i: int) -> str:
        return self.tok.id_to_token(i) or ""


class Tokenizer:
    """Text <-> ids with PaliGemma's special ids, from a model folder."""

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        model, tjson = folder / "tokenizer.model", folder / "tokenizer.json"
        if model.is_file():
            self.backend = _SentencePiece(model)
        elif tjson.is_file():
            self.backend = _TokenizerJson(tjson)
        else:
            raise CheckpointError(f"missing tokenizer: neither tokenizer.model nor tokenizer.json in {folder}")
        self.bos_id = self._required("<bos>")
        self.eos_id = self._required("<eos>")
        self.pad_id = self._required("<pad>")
        try:
            self.image_id = _image_token_id(folder, fallback=self.backend.size)
        except (ValueError, TypeError, AttributeError, KeyError) as err:  # non-JSON or odd side files
            raise CheckpointError(f"cannot read the <image> token from the tokenizer files in {folder}: "
                                  f"{str(err)[:160]}") from None
        self.loc0 = self.backend.token_id("<loc0000>")
        self.seg0 = self.backend.token_id("<seg000>")
        self.newline_ids = self.backend.encode("\n")
        self.vocab_size = self.backend.size  # ids the model may emit (257152 for real ones)
        self._controls = {self.bos_id, self.eos_id, self.pad_id}
        self._forbidden = self._controls | {self.image_id}

    def _required(self, piece: str) -> int:
        i = self.backend.token_id(piece)
        if i is None:
            raise CheckpointError(f"tokenizer has no {piece} token")
        return i

    def encode(self, text: str) -> list[int]:
        """User text -> ids. It can never produce `<bos>`/`<eos>`/`<pad>`/`<image>` (typed,
        they are encoded as their characters); `<locNNNN>`/`<segNNN>` typed in the text are the
        location/segmentation tokens, as in big_vision and transformers."""
        ids = self.backend.encode(check_text(text))
        if any(i in self._forbidden for i in ids):  # a tokenizer file whose specials are not marked special
            raise PgEdgeError("this tokenizer turns text such as <image> or <eos> in the prompt into "
                              "control tokens; remove them from the prompt")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text; `<bos>`/`<eos>`/`<pad>`/`<image>` dropped, `<locNNNN>` kept."""
        keep = [int(i) for i in ids if i not in self._controls and 0 <= i < self.vocab_size]
        return self.backend.decode(keep)

    def piece(self, i: int) -> str:
        return self.backend.piece(i)

    def prompt_ids(self, prefix: str, num_image_tokens: int) -> list[int]:
        """`<image>` x N + `<bos>` + prefix + "\\n" (the separator tokenized on its own)."""
        return [self.image_id] * num_image_tokens + [self.bos_id] + self.encode(prefix) + list(self.newline_ids)

    def suffix_ids(self, suffix: str) -> list[int]:
        """Training target: suffix + `<eos>`."""
        return self.encode(suffix) + [self.eos_id]


def _image_token_id(folder: Path, fallback: int) -> int:
    """`<image>` is an added token (added_tokens.json / tokenizer_config.json / tokenizer.json)."""
    added = folder / "added_tokens.json"
    if added.is_file():
        table = read_json(added)
        if "<image>" in table:
            return int(table["<image>"])
    conf = folder / "tokenizer_config.json"
    if conf.is_file():
        for k, v in (read_json(conf).get("added_tokens_decoder") or {}).items():
            if v.get("content") == "<image>":
                return int(k)
    tj = folder / "tokenizer.json"
    if tj.is_file():
        for tok in read_json(tj).get("added_tokens", []):
            if tok.get("content") == "<image>":
                return int(tok["id"])
    return fallback
