"""`PaliGemma`: the one object an app holds — model, processor, vision-feature cache, generation.

    import pg_edge
    pg = pg_edge.load("path/or/hub-id")
    print(pg.generate("cat.jpg", "caption en").text)
    for piece in pg.stream("cat.jpg", "answer en what colour is the cat?"):
        print(piece.text, end="", flush=True)

Vision features are cached by the content of the preprocessed pixels, so several prompts on one
image run SigLIP once (`vision_calls` counts the encoder runs).
"""
from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import mlx.core as mx
import numpy as np

from .config import PaliGemmaConfig
from .errors import PgEdgeError
from . import vision_tasks
from .generate import GenerationResult, StreamDecoder, generate_step, sampler_for
from .loader import load_model, resolve
from .paligemma import PaliGemmaModel
from .processor import ImageInput, Inputs, Processor, Tokenizer


@dataclass
class Chunk:
    """One streamed piece: new text (possibly empty), the token that produced it, and on the
    last chunk the whole result."""

    text: str
    token: int | None
    result: GenerationResult | None = None


class PaliGemma:
    def __init__(self, model: PaliGemmaModel, config: PaliGemmaConfig, tokenizer: Tokenizer,
                 folder: Path | None = None, vision_cache_size: int = 16):
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.folder = folder
        self.processor = Processor(tokenizer, config.vision.image_size, config.num_image_tokens)
        self.vision_calls = 0
        self._vision_cache: OrderedDict[str, mx.array] = OrderedDict()
        self._vision_cache_size = vision_cache_size

    # -- stages --------------------------------------------------------------------------
    def image_features(self, pixel_values: np.ndarray) -> mx.array:
        """float32[B, S, S, 3] -> float[B, N, D]; rows seen before come from the cache."""
        keys = [hashlib.sha1(np.ascontiguousarray(p).tobytes()).hexdigest() for p in pixel_values]
        missing = [i for i, k in enumerate(keys) if k not in self._vision_cache]
        if missing:
            self.vision_calls += 1
            feats = self.model.encode_image(mx.array(pixel_values[missing]))
            mx.eval(feats)
            for j, i in enumerate(missing):
                self._vision_cache[keys[i]] = feats[j]
        for k in keys:
            self._vision_cache.move_to_end(k)
        out = mx.stack([self._vision_cache[k] for k in keys])
        while len(self._vision_cache) > self._vision_cache_size:
            self._vision_cache.popitem(last=False)
        return out

    def prepare(self, images: Sequence[ImageInput], prompts: Sequence[str]) -> Inputs:
        return self.processor(images, prompts)

    def logits(self, image: ImageInput, prompt: str) -> np.ndarray:
        """float32[V] next-token logits after the prompt (for parity checks)."""
        inp = self.prepare([image], [prompt])
        feats = self.image_features(inp.pixel_values)
        out = self.model(mx.array(inp.input_ids), image_features=feats, last_only=True)
        return np.array(out[0, -1].astype(mx.float32))

    # -- generation ----------------------------------------------------------------------
    def _run(self, images, prompts, max_tokens, temperature, top_p, top_k, seed) -> Iterator:
        if max_tokens < 1:
            raise PgEdgeError(f"max_tokens must be >= 1, got {max_tokens}")
        sampler = sampler_for(temperature, top_p, top_k)
        if seed is not None:
            mx.random.seed(int(seed))
        inp = self.prepare(images, prompts)
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        feats = self.image_features(inp.pixel_values)
        t1 = time.perf_counter()
        valid = None if inp.valid.all() else mx.array(inp.valid)
        steps = generate_step(self.model, mx.array(inp.input_ids), feats, valid=valid,
                              sampler=sampler, max_tokens=max_tokens)
        return inp, steps, (t0, t1)

    def stream(self, image: ImageInput, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> Iterator[Chunk]:
        """Yield text pieces as tokens arrive; the last chunk carries the GenerationResult."""
        inp, steps, (t0, t1) = self._run([image], [prompt], max_tokens, temperature, top_p, top_k, seed)
        decoder = StreamDecoder(self.tokenizer)
        eos = self.tokenizer.eos_id
        tokens: list[int] = []
        finish = "length"
        t2 = None
        for tok, _ in steps:
            t = int(tok[0])
            if t2 is None:
                t2 = time.perf_counter()
            if t == eos:
                finish = "stop"
                break
            tokens.append(t)
            piece = decoder.add(t)
            if piece:
                yield Chunk(piece, t)
        t3 = time.perf_counter()
        tail = decoder.finish()
        result = GenerationResult(
            text=decoder.emitted, tokens=tokens, prompt_tokens=int(inp.valid.sum()),
            finish_reason=finish, vision_seconds=t1 - t0, prompt_seconds=(t2 or t3) - t1,
            generation_seconds=t3 - (t2 or t3), peak_memory_gb=mx.get_peak_memory() / 1e9,
        )
        yield Chunk(tail, None, result)

    def generate(self, image: ImageInput, prompt: str, **kwargs) -> GenerationResult:
        """Run to eos or max_tokens; returns text, token ids, timings and peak memory."""
        for chunk in self.stream(image, prompt, **kwargs):
            if chunk.result is not None:
                return chunk.result
        raise AssertionError("stream ended without a result")

    def generate_batch(self, images: Sequence[ImageInput], prompts: Sequence[str], *, max_tokens: int = 256,
                       temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                       seed: int | None = None) -> list[GenerationResult]:
        """Several (image, prompt) pairs at once; prompts of different lengths are left-padded.
        Greedy results equal running each pair alone."""
        inp, steps, (t0, t1) = self._run(images, prompts, max_tokens, temperature, top_p, top_k, seed)
        B = len(prompts)
        eos = self.tokenizer.eos_id
        rows: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        t2 = None
        for tok, _ in steps:
            t2 = t2 or time.perf_counter()
            for b, t in enumerate(tok.tolist()):
                if not done[b]:
                    if t == eos:
                        done[b] = True
                    else:
                        rows[b].append(t)
            if all(done):
                break
        t3 = time.perf_counter()
        return [
            GenerationResult(
                text=self.tokenizer.decode(r), tokens=r, prompt_tokens=int(inp.valid[b].sum()),
                finish_reason="stop" if done[b] else "length", vision_seconds=t1 - t0,
                prompt_seconds=(t2 or t3) - t1, generation_seconds=t3 - (t2 or t3),
                peak_memory_gb=mx.get_peak_memory() / 1e9,
            )
            for b, r in enumerate(rows)
        ]


    # -- tasks (pg_edge.vision_tasks): prompts in the official forms, outputs parsed ------------
    def caption(self, image: ImageInput, lang: str = "en", **gen):
        return vision_tasks.caption(self, image, lang=lang, **gen)

    def ocr(self, image: ImageInput, **gen):
        return vision_tasks.ocr(self, image, **gen)

    def ask(self, image: ImageInput, question: str, lang: str = "en", **gen):
        return vision_tasks.ask(self, image, question, lang=lang, **gen)

    def detect(self, image: ImageInput, objects, **gen):
        """Boxes in the original image's pixels: `.objects` (label, box), `.skipped`."""
        return vision_tasks.detect(self, image, objects, **gen)

    def segment(self, image: ImageInput, objects, vae=None, **gen):
        """Boxes and boolean masks; `vae` is a converted VAE file or `vae.safetensors` in the
        model folder."""
        return vision_tasks.segment(self, image, objects, vae=vae, **gen)


def load(path_or_id: str | os.PathLike, *, dtype: mx.Dtype | None = None,
         adapters: str | os.PathLike | None = None) -> PaliGemma:
    """Load a converted folder, an mlx-community folder, or an HF checkpoint (folder or hub id);
    `adapters`: a folder written by `pg-edge finetune --export adapters`, applied on top."""
    folder = resolve(path_or_id)
    tokenizer = Tokenizer(folder)  # before the weights: a missing tokenizer fails fast
    model, config, folder = load_model(folder, dtype=dtype)
    if adapters is not None:
        from .train.export import load_adapters

        load_adapters(model, adapters)
        model.eval()
    return PaliGemma(model, config, tokenizer, folder)
