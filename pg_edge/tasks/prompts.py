"""The task prompts as text, no model, in the official forms. (Reading the model's answers back:
pg_edge/tasks/parse.py; the tasks as calls on a loaded model: pg_edge/tasks/calls.py.)

Prompts (ai.google.dev/gemma/docs/paligemma/prompt-system-instructions; HF blog paligemma.md):

    caption {lang}          short COCO-like caption        describe {lang}   longer caption
    cap {lang}              very raw WebLI alt-text style caption
    ocr                     read the text in the image
    answer {lang} {question}   visual question answering
    question {lang} {answer}   question generation for a given answer
    detect {obj} ; {obj}    boxes          segment {obj} ; {obj}   boxes + 16 mask codes each

Which checkpoints honour which prefix varies (Google's newest page marks cap, describe, ocr and
question as pt-only for PaliGemma 2 mix); the builders accept them all.

The builders return the prefix WITHOUT the trailing "\\n": the processor appends "\\n" as its
own token (see PALIGEMMA.md, "Prompt"), so a "\\n" inside an argument would end the prefix
early and is refused, as are `;` inside an object name (it is the separator) and special-token
text such as `<loc0001>` or `<image>` (the tokenizer would turn it into the real token).
"""

from __future__ import annotations

import re
from typing import Sequence

from pg_edge.errors import PgEdgeError

_LANG_RE = re.compile(r"^[a-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})?$")  # en, zh, pt-BR, zh_TW
_SPECIAL_RE = re.compile(r"<(?:loc\d+|seg\d+|image|bos|eos|pad|unk|s|/s)>")


def _check_lang(lang: str) -> str:
    if not isinstance(lang, str) or not _LANG_RE.match(lang):
        raise PgEdgeError(f"language must be a code such as 'en' or 'pt-BR', got {lang!r}")
    return lang


def _check_text(what: str, text: str) -> str:
    """One line of free text: collapsed whitespace, no newline, no special-token text."""
    if not isinstance(text, str):
        raise PgEdgeError(f"{what} must be a string, got {type(text).__name__}")
    if "\n" in text or "\r" in text:
        raise PgEdgeError(f"{what} must be one line (a newline ends the prompt): {text!r}")
    if _SPECIAL_RE.search(text):
        raise PgEdgeError(f"{what} contains special-token text: {text!r}")
    text = " ".join(text.split())
    if not text:
        raise PgEdgeError(f"{what} is empty")
    return text


def _objects(objects: str | Sequence[str]) -> str:
    # A single string may already be "cat ; dog" (as typed on a command line).
    items = objects.split(";") if isinstance(objects, str) else list(objects)
    names = []
    for item in items:
        if isinstance(item, str) and ";" in item:
            raise PgEdgeError(f"object name must not contain ';' (the separator): {item!r}")
        names.append(_check_text("object name", item))
    if not names:
        raise PgEdgeError("give at least one object name")
    return " ; ".join(names)


def object_names(objects: str | Sequence[str]) -> list[str]:
    """The names a detect/segment prompt asks for: "cat ; dog" or ["cat", "dog"] -> ["cat", "dog"]
    (checked as in the prompt)."""
    return _objects(objects).split(" ; ")


def caption(lang: str = "en") -> str:
    """`caption {lang}`: a short COCO-like caption."""
    return f"caption {_check_lang(lang)}"


def cap(lang: str = "en") -> str:
    """`cap {lang}`: a very raw short caption (WebLI alt-text style)."""
    return f"cap {_check_lang(lang)}"


def describe(lang: str = "en") -> str:
    """`describe {lang}`: a longer, more descriptive caption."""
    return f"describe {_check_lang(lang)}"


def ocr() -> str:
    """`ocr`: the text in the image."""
    return "ocr"


def answer(question: str, lang: str = "en") -> str:
    """`answer {lang} {question}`: visual question answering."""
    return f"answer {_check_lang(lang)} {_check_text('question', question)}"


def question(answer: str, lang: str = "en") -> str:
    """`question {lang} {answer}`: generate a question whose answer is `answer`."""
    return f"question {_check_lang(lang)} {_check_text('answer', answer)}"


def detect(objects: str | Sequence[str]) -> str:
    """`detect cat ; dog`: one box per found instance, see `parse_objects`."""
    return f"detect {_objects(objects)}"


def segment(objects: str | Sequence[str]) -> str:
    """`segment cat ; dog`: a box plus 16 mask codes per instance, see `parse_objects`."""
    return f"segment {_objects(objects)}"
