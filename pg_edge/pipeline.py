"""`PaliGemma`: the one object an app holds — model, processor, vision-feature cache, generation.

    import pg_edge
    pg = pg_edge.load("path/or/hub-id")
    print(pg.generate("cat.jpg", "caption en").text)
    for piece in pg.stream("cat.jpg", "answer en what colour is the cat?"):
        print(piece.text, end="", flush=True)

Vision features are cached by the content of the preprocessed pixels, so several prompts on one
image run SigLIP once (`vision_calls` counts the encoder runs).

Threads may share one object: the model calls run on its worker thread one at a time
(pg_edge/worker.py), and the vision-feature cache is shared by all callers. `pg.cancel()` stops
the generation that is running (its result says finish_reason "cancelled"); breaking out of a
`stream` loop stops that stream's generation.
"""
from __future__ import annotations

import hashlib
import os
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import mlx.core as mx
import numpy as np

from .errors import PgEdgeError
from .model.config import PaliGemmaConfig
from .model.config_checks import check_tokenizer_fits
from .tasks import calls
from .generate import Chunk, GenerationResult, Sampling, generate, generate_batch, stream_generate
from .checkpoint.folder import resolve
from .checkpoint.loader import load_folder
from .model.paligemma import PaliGemmaModel
from .inputs.images import ImageInput
from .inputs.processor import Inputs, Processor, Tokenizer
from .inputs.checks import check_context, check_max_tokens, context_length
from .worker import ModelWorker, serialized, serialized_stream


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
        self._worker = ModelWorker()  # owns every model call (see pg_edge/worker.py)
        # Dropped without close(): the thread is parked all the same (it never refers back here).
        # Not at interpreter exit: the thread must then stay blocked on its queue (a thread still
        # running Python when the interpreter finalizes is ended, and MLX aborts).
        weakref.finalize(self, self._worker.close).atexit = False
        # MLX evaluates a lazy graph only on the thread that built it: make the weights concrete
        # here, so the worker thread can use them.
        mx.eval(model.parameters())

    def cancel(self) -> bool:
        """Stop the generation running now (any thread may call this); True if one was."""
        return self._worker.cancel()

    def close(self) -> None:
        """Release the model's worker thread: the running generation stops (finish_reason
        "cancelled"), queued and later calls raise PgEdgeError. Also on leaving a `with` block;
        a PaliGemma dropped without close() releases it when garbage-collected."""
        self._worker.close()

    def __enter__(self) -> "PaliGemma":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- stages --------------------------------------------------------------------------
    @serialized
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

    @serialized
    def logits(self, image: ImageInput, prompt: str) -> np.ndarray:
        """float32[V] next-token logits after the prompt (for parity checks)."""
        inp = self.prepare([image], [prompt])
        check_context(int(inp.valid.sum()), 0, context_length(self.config), self.config.num_image_tokens)
        feats = self.image_features(inp.pixel_values)
        out = self.model(mx.array(inp.input_ids), image_features=feats, last_only=True)
        return np.array(out[0, -1].astype(mx.float32))

    # -- generation: thin calls onto pg_edge.generate's layers ----------------------------
    def _start(self, images: Sequence[ImageInput], prompts: Sequence[str], max_tokens: int):
        """Inputs and image features for a generation, timed; resets the peak-memory count.
        What does not fit the context is refused here, before any compute."""
        max_tokens = check_max_tokens(max_tokens)
        inp = self.prepare(images, prompts)
        context = context_length(self.config)
        for n in inp.valid.sum(axis=1):
            check_context(int(n), max_tokens, context, self.config.num_image_tokens)
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        feats = self.image_features(inp.pixel_values)
        valid = None if inp.valid.all() else mx.array(inp.valid)
        return mx.array(inp.input_ids), feats, valid, time.perf_counter() - t0

    @serialized_stream
    def stream(self, image: ImageInput, prompt: str, *, max_tokens: int = 256,
               sampling: Sampling | None = None, **settings) -> Iterator[Chunk]:
        """Yield text pieces as tokens arrive; the last chunk carries the GenerationResult.
        `sampling`: a generate.Sampling, or its fields as keywords (temperature, top_p, top_k,
        seed); default greedy. From another thread than the worker the iterator is a
        pg_edge.worker.WorkerStream: `.cancel()` ends the generation early (the last chunk still
        comes), `.close()` drops it."""
        sampling = Sampling.of(sampling, **settings)
        ids, feats, valid, vision_s = self._start([image], [prompt], max_tokens)
        yield from stream_generate(self.model, self.tokenizer, ids, feats, valid=valid, sampling=sampling,
                                   max_tokens=max_tokens, vision_seconds=vision_s,
                                   should_stop=self._worker.cancelled)

    @serialized
    def generate(self, image: ImageInput, prompt: str, *, max_tokens: int = 256,
                 sampling: Sampling | None = None, **settings) -> GenerationResult:
        """Run to eos or max_tokens; returns text, token ids, timings and peak memory."""
        sampling = Sampling.of(sampling, **settings)
        ids, feats, valid, vision_s = self._start([image], [prompt], max_tokens)
        return generate(self.model, self.tokenizer, ids, feats, valid=valid, sampling=sampling,
                        max_tokens=max_tokens, vision_seconds=vision_s,
                        should_stop=self._worker.cancelled)

    @serialized
    def generate_batch(self, images: Sequence[ImageInput], prompts: Sequence[str], *, max_tokens: int = 256,
                       sampling: Sampling | None = None, **settings) -> list[GenerationResult]:
        """Several (image, prompt) pairs at once; prompts of different lengths are left-padded.
        Greedy results equal running each pair alone."""
        sampling = Sampling.of(sampling, **settings)
        ids, feats, valid, vision_s = self._start(images, prompts, max_tokens)
        return generate_batch(self.model, self.tokenizer, ids, feats, valid=valid, sampling=sampling,
                              max_tokens=max_tokens, vision_seconds=vision_s,
                              should_stop=self._worker.cancelled)

    # -- tasks (pg_edge.tasks.calls): prompts in the official forms, outputs parsed ------------
    def caption(self, image: ImageInput, lang: str = "en", **gen):
        return calls.caption(self, image, lang=lang, **gen)

    def ocr(self, image: ImageInput, **gen):
        return calls.ocr(self, image, **gen)

    def ask(self, image: ImageInput, question: str, lang: str = "en", **gen):
        return calls.ask(self, image, question, lang=lang, **gen)

    def detect(self, image: ImageInput, objects, **gen):
        """Boxes in the original image's pixels: `.objects` (label, box), `.skipped`."""
        return calls.detect(self, image, objects, **gen)

    def segment(self, image: ImageInput, objects, vae=None, **gen):
        """Boxes and boolean masks; `vae` is a converted VAE file or `vae.safetensors` in the
        model folder."""
        # On the worker as a whole: the mask decoder's MLX work is serialised with the rest.
        return self._worker.call(calls.segment, self, image, objects, vae=vae, **gen)


KV_BITS = (None, 8)  # `load(kv_bits=)`: the float cache, or mlx-lm's 8-bit one


def load(path_or_id: str | os.PathLike, *, dtype: mx.Dtype | None = None,
         adapters: str | os.PathLike | None = None, attention: str = "window",
         kv_bits: int | None = None) -> PaliGemma:
    """Load a converted folder, an mlx-community folder, or an HF checkpoint (folder or hub id);
    `adapters`: a folder written by `pg-edge finetune --export adapters`, applied on top;
    `attention`: "window" (default, as transformers) or "global" (as big_vision trained
    PaliGemma 2) for Gemma2's sliding layers; they differ only past 4096 tokens (896 px) —
    see pg_edge.model.masks.ATTENTION_MODES. `kv_bits`: 8 keeps generation's KV cache quantized
    (mlx-lm's QuantizedKVCache): about half a bf16 cache's memory and reads; docs/performance.md
    has its measured agreement with the float cache (4 bits agreed too poorly to offer). None
    (default): the cache in the activations' float dtype."""
    if kv_bits not in KV_BITS:
        raise PgEdgeError(f"kv_bits must be 8 or None, got {kv_bits!r}")
    folder = resolve(path_or_id)
    tokenizer = Tokenizer(folder)  # before the weights: a missing tokenizer fails fast
    model, config = load_folder(folder, dtype=dtype)
    check_tokenizer_fits(tokenizer, config)  # an id past the embedding would read out of bounds
    model.set_attention(attention)
    model.kv_bits = kv_bits
    if adapters is not None:
        from .adapters import load_adapters

        load_adapters(model, adapters)
        model.eval()
    return PaliGemma(model, config, tokenizer, folder)
