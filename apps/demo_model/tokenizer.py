"""The demo model's SentencePiece tokenizer, trained with sentencepiece's own BPE trainer.

Layout (deliberately NOT Gemma's, so the runtime has to read every special id from the files):

    0 <unk>   1 <bos>   2 <eos>   3 <pad>                 control pieces
    4 "\\n"                                              user-defined (the prefix separator)
    5..132     <seg000> .. <seg127>                     user-defined
    133..1156  <loc0000> .. <loc1023>                   user-defined
    1157..1412 <0x00> .. <0xFF>                         byte fallback: any text encodes
    1413..     BPE pieces of the task's words
    (HF only)  <image> = the sp size, in added_tokens.json (as in the real checkpoints)

Normalizer as Gemma's: identity, no dummy prefix, whitespace kept. Dev tool (python -m
apps.demo_model.tokenizer OUT): the runtime never imports it.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

SEG = [f"<seg{i:03d}>" for i in range(128)]
LOC = [f"<loc{i:04d}>" for i in range(1024)]
_WORDS = ["caption en", "answer en how many shapes?", "detect", "segment", "circle", "square",
          "triangle", "red", "green", "blue", "yellow", " and ", ", ", " ; ", "a ", "1", "2", "3"]


def _corpus() -> list[str]:
    from pg_edge.demo import shapes as S

    lines = []
    for s in S.split("train", 400):
        lines += [S.caption(s.shapes), S.CAPTION_PROMPT, S.COUNT_PROMPT,
                  S.detect_prompt(S.KINDS), S.segment_prompt(S.KINDS[::-1]),
                  " ; ".join(sh.kind for sh in s.shapes)]
    return lines + _WORDS * 20


def build(out: Path) -> Path:
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, model_type="bpe",
        vocab_size=1413 + 200, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=3, bos_piece="<bos>", eos_piece="<eos>", pad_piece="<pad>",
        user_defined_symbols=["\n"] + SEG + LOC, byte_fallback=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    size = sp.GetPieceSize()
    (out / "added_tokens.json").write_text(json.dumps({"<image>": size}) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
         "additional_special_tokens": ["<image>"]}, indent=2) + "\n")
    return out


if __name__ == "__main__":
    folder = build(Path(sys.argv[1]))
    from pg_edge.inputs.tokenizer import Tokenizer

    t = Tokenizer(folder)
    print(f"{folder}: {t.vocab_size} pieces, bos {t.bos_id} eos {t.eos_id} pad {t.pad_id} "
          f"image {t.image_id} loc0 {t.loc0} seg0 {t.seg0} newline {t.newline_ids}")
