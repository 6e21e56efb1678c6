"""`PaliGemma`: the one object an app holds — model, processor, vision-feature cache, generation.

    import pg_edge
    pg = pg_edge.load("path/or/hub-id")
    print(pg.generate("cat.jpg", "caption en").text)
    for piece in pg.stream("cat.jpg", "answer en what colour is the cat?"):
        print(piece.text, end="", flush=True)

Vision features are cached by the content of the preprocessed pixels, so several prompts on one
image run SigLIP once (`vision_calls` counts the encoder runs).

Threads may share one object: the model calls run on its worker thread one at a time
(pg_edge/worker.py), and the vision-feature cache is shared by all callers. Generations asked for
at the same time (`generate`, `stream` and the tasks, from several threads) decode together in
one batch of up to `max_batch` rows (pg_edge/batching.py: a request joins at a token boundary
and leaves at its end; requests arriving together, or announced with `pg.announce()` as a
server does once it has read one, start in one prefill); greedy results equal each one run
alone. `pg.cancel()` stops the
generations that are running (their results say finish_reason "cancelled"); breaking out of a
`stream` loop, or setting the `cancel` event a call was given, stops that one alone.

Adapters by name share the loaded base (pg_edge/adapter_bank.py):

    pg = pg_edge.load("model", adapters={"receipts": "adapters/receipts"})
    pg.add_adapter("defects", "adapters/defects")
    pg.generate("r.jpg", "ocr", adapter="receipts")       # adapter=None: the base alone
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
from .batching import Request, run_alone
from .scheduler import Arrival, Scheduler
from .generate import Chunk, GenerationResult, Sampling, generate_batch
from .checkpoint.folder import resolve
from .checkpoint.loader import load_folder
from .cpu import pages
from .model.paligemma import PaliGemmaModel
from .inputs.images import ImageInput
from .inputs.processor import Inputs, Processor, Tokenizer
from .inputs.checks import check_context, check_max_tokens, context_length
from .worker import ModelWorker, serialized


class PaliGemma:
    def __init__(self, model: PaliGemmaModel, config: PaliGemmaConfig, tokenizer: Tokenizer,
                 folder: Path | None = None, vision_cache_size: int = 16, max_batch: int = 8):
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.folder = folder
        self.processor = Processor(tokenizer, config.vision.image_size, config.num_image_tokens)
        self.vision_calls = 0
        self._vision_cache: OrderedDict[str, mx.array] = OrderedDict()
        self._vision_cache_size = vision_cache_size
        self._worker = ModelWorker()  # owns every model call (see pg_edge/worker.py)
        self._bank = None  # named adapters (pg_edge.adapter_bank), made by the first add_adapter
        self._scheduler = Scheduler(self, max_batch)
        # Dropped without close(): the thread is parked all the same (it never refers back here).
        # Not at interpreter exit: the thread must then stay blocked on its queue (a thread still
        # running Python when the interpreter finalizes is ended, and MLX aborts).
        weakref.finalize(self, self._worker.close).atexit = False
        # MLX evaluates a lazy graph only on the thread that built it: make the weights concrete
        # here, so the worker thread can use them.
        mx.eval(model.parameters())
        pages.settle(model)  # on a Linux CPU: the weights on 2 MB pages (faster decode reads)

    @property
    def max_batch(self) -> int:
        """How many generations decode together at most (1: one at a time)."""
        return self._scheduler.max_batch

    @max_batch.setter
    def max_batch(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise PgEdgeError(f"max_batch must be a positive integer, got {n!r}")
        self._scheduler.max_batch = n

    def announce(self) -> Arrival:
        """A generation is coming (a server has just read its request): while it is on its way
        an idle batch holds its first prefill for it (briefly: pg_edge.scheduler.GATHER_S), so
        that requests arriving together are prefilled together. Pass the Arrival to
        `stream(arrival=...)`, or leave a `with` block on it (withdrawn if never used).
        Any thread may call this."""
        return self._scheduler.announce()

    def cancel(self) -> bool:
        """Stop the generations running now (any thread may call this); True if one was."""
        return self._scheduler.cancel_all() or self._worker.cancel()

    def close(self) -> None:
        """Release the model's worker thread: the running generations stop (finish_reason
        "cancelled"), queued and later calls raise PgEdgeError. Also on leaving a `with` block;
        a PaliGemma dropped without close() releases it when garbage-collected."""
        self._worker.close()
        self._scheduler.close(PgEdgeError("this model was closed (PaliGemma.close())"))

    # -- adapters by name --------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        """Names of the adapters loaded on this base."""
        return self._bank.names() if self._bank is not None else []

    @serialized
    def add_adapter(self, name: str, folder: str | os.PathLike) -> None:
        """Load a LoRA adapter folder (`pg-edge finetune --export adapters`) under `name`; the
        base weights stay shared. Refused in one line if it was made for another base."""
        from .adapter_bank import AdapterBank

        if self._bank is None:
            self._bank = AdapterBank(self.model)
        self._bank.add(name, folder)
        mx.eval(self.model.parameters())

    @serialized
    def remove_adapter(self, name: str) -> None:
        """Unload adapter `name` (refused while a running generation uses it)."""
        if self._bank is None:
            raise PgEdgeError(f"no adapter named {name!r} (adapters: none loaded)")
        busy = sum(r.adapter == name for r in self._scheduler.batch.rows)
        if busy:
            raise PgEdgeError(f"adapter {name!r} is in use by {busy} running generation(s)")
        self._bank.remove(name)
        drop = [k for k in self._vision_cache if k.endswith("|" + name)]
        for k in drop:
            del self._vision_cache[k]

    def _check_adapter(self, adapter) -> None:
        if adapter is not None or self._bank is not None:
            (self._bank.slot(adapter) if self._bank is not None else
             _no_adapters(adapter))

    def _route(self, slots: list[int]) -> None:
        """Which adapter slot each row of the next model call uses (0: the base alone)."""
        if self._bank is not None:
            self._bank.routing.set(slots)

    def __enter__(self) -> "PaliGemma":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- stages --------------------------------------------------------------------------
    @serialized
    def image_features(self, pixel_values: np.ndarray, adapter: str | None = None) -> mx.array:
        """float32[B, S, S, 3] -> float[B, N, D] (with `adapter`'s vision and connector
        deltas); rows seen before come from the cache, keyed by pixels and adapter."""
        return self._features(pixel_values, adapter)

    def _features(self, pixel_values: np.ndarray, adapter) -> mx.array:
        """`adapter`: one name (or None) for every row, or a list of them, one per row; the
        rows not cached yet are encoded in one call, each with its own adapter."""
        names = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * len(pixel_values)
        slots = [self._bank.slot(a) if self._bank is not None else _no_adapters(a) for a in names]
        keys = [hashlib.sha1(np.ascontiguousarray(p).tobytes()).hexdigest() + ("" if a is None else "|" + a)
                for p, a in zip(pixel_values, names)]
        missing = [i for i, k in enumerate(keys) if k not in self._vision_cache and k not in keys[:i]]
        if missing:
            self.vision_calls += 1
            self._route([slots[i] for i in missing])
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
    def logits(self, image: ImageInput, prompt: str, *, adapter: str | None = None) -> np.ndarray:
        """float32[V] next-token logits after the prompt (for parity checks)."""
        inp = self.prepare([image], [prompt])
        check_context(int(inp.valid.sum()), 0, context_length(self.config), self.config.num_image_tokens)
        feats = self._features(inp.pixel_values, adapter)
        self._route([self._bank.slot(adapter) if self._bank is not None else 0])
        out = self.model(mx.array(inp.input_ids), image_features=feats, last_only=True)
        return np.array(out[0, -1].astype(mx.float32))

    # -- generation: requests into the running batch (pg_edge.batching) ----------------------
    def _request(self, image: ImageInput, prompt: str, max_tokens: int, sampling, settings,
                 adapter, cancel) -> Request:
        """One generation's inputs, checked and prepared: what does not fit the context, or
        names no loaded adapter, is refused here, before any compute."""
        sampling = Sampling.of(sampling, **settings)
        max_tokens = check_max_tokens(max_tokens)
        self._check_adapter(adapter)
        inp = self.prepare([image], [prompt])
        check_context(int(inp.valid.sum()), max_tokens, context_length(self.config), self.config.num_image_tokens)
        ids = inp.input_ids[0][inp.valid[0]]
        return Request(ids, inp.pixel_values[0], adapter, sampling, max_tokens, cancel)

    def stream(self, image: ImageInput, prompt: str, *, max_tokens: int = 256,
               sampling: Sampling | None = None, adapter: str | None = None, cancel=None,
               arrival=None, **settings) -> Iterator[Chunk]:
        """Yield text pieces as tokens arrive; the last chunk carries the GenerationResult.
        `sampling`: a generate.Sampling, or its fields as keywords (temperature, top_p, top_k,
        seed); default greedy. `adapter`: a loaded adapter's name (None: the base alone).
        `cancel`: a threading.Event; setting it ends this generation ("cancelled").
        `arrival`: what `announce()` gave for this request (a server announces a request as
        soon as it has read it); this call consumes it.
        From another thread than the worker the iterator is a pg_edge.scheduler.RowStream:
        `.cancel()` ends the generation early (the last chunk still comes), `.close()` drops it.
        Concurrent calls decode together (see the module docstring)."""
        # Prepared on the worker, as every call's inputs are (one thread's allocator: big images
        # from many callers do not each leave their own heap behind).
        if self._worker.on_worker():
            return run_alone(self, self._request(image, prompt, max_tokens, sampling, settings, adapter, cancel))
        # Announced first (unless the caller did): an idle batch waits for requests arriving
        # together, so that they are prefilled in one pass.
        own = arrival is None
        arrival = arrival or self._scheduler.announce()
        try:
            req = self._worker.call(self._request, image, prompt, max_tokens, sampling, settings, adapter, cancel)
        except BaseException:
            if own:
                arrival.withdraw()
            raise
        return self._scheduler.submit(req, arrival)

    def generate(self, image: ImageInput, prompt: str, *, max_tokens: int = 256,
                 sampling: Sampling | None = None, adapter: str | None = None, cancel=None,
                 **settings) -> GenerationResult:
        """Run to eos or max_tokens; returns text, token ids, timings and peak memory."""
        stream = self.stream(image, prompt, max_tokens=max_tokens, sampling=sampling, adapter=adapter,
                             cancel=cancel, **settings)
        try:
            for chunk in stream:
                if chunk.result is not None:
                    return chunk.result
        except BaseException:
            getattr(stream, "close", lambda: None)()
            raise
        raise PgEdgeError("the generation ended without a result")

    @serialized
    def generate_batch(self, images: Sequence[ImageInput], prompts: Sequence[str], *, max_tokens: int = 256,
                       sampling: Sampling | None = None, adapter=None, **settings) -> list[GenerationResult]:
        """Several (image, prompt) pairs at once, as one fixed batch; prompts of different
        lengths are left-padded. `adapter`: one name for every row, or a list (one per row).
        Greedy results equal running each pair alone."""
        sampling = Sampling.of(sampling, **settings)
        names = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * len(images)
        if len(names) != len(images):
            raise PgEdgeError(f"{len(names)} adapters for {len(images)} images")
        for name in names:
            self._check_adapter(name)
        max_tokens = check_max_tokens(max_tokens)
        inp = self.prepare(images, prompts)
        context = context_length(self.config)
        for n in inp.valid.sum(axis=1):
            check_context(int(n), max_tokens, context, self.config.num_image_tokens)
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        feats = mx.concatenate([self._features(inp.pixel_values[i:i + 1], name) for i, name in enumerate(names)])
        valid = None if inp.valid.all() else mx.array(inp.valid)
        self._route([self._bank.slot(n) if self._bank is not None else 0 for n in names])
        return generate_batch(self.model, self.tokenizer, mx.array(inp.input_ids), feats, valid=valid,
                              sampling=sampling, max_tokens=max_tokens, vision_seconds=time.perf_counter() - t0,
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
        # The generation joins the batch like any other; the mask decoder runs on the worker.
        decoder = self._worker.call(calls.find_vae, self, vae)  # a missing one fails fast
        return calls.segment(self, image, objects, vae=decoder, masks=self._worker.call, **gen)


def _no_adapters(adapter) -> int:
    if adapter is not None:
        raise PgEdgeError(f"no adapter named {adapter!r} (adapters: none loaded)")
    return 0


KV_BITS = (None, 8)  # `load(kv_bits=)`: the float cache, or mlx-lm's 8-bit one


def load(path_or_id: str | os.PathLike, *, dtype: mx.Dtype | None = None,
         adapters: "str | os.PathLike | dict | None" = None, attention: str = "window",
         max_batch: int = 8, kv_bits: int | None = None) -> PaliGemma:
    """Load a converted folder, an mlx-community folder, or an HF checkpoint (folder or hub id);
    `adapters`: a folder written by `pg-edge finetune --export adapters`, applied on top, or
    {name: folder} of LoRA adapters loaded by name on the shared base (pick one per call with
    `adapter=name`); `max_batch`: how many concurrent generations decode together;
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
    named = adapters if isinstance(adapters, dict) else {}
    if adapters is not None and not isinstance(adapters, dict):
        from .adapters import load_adapters

        load_adapters(model, adapters)
        model.eval()
    pg = PaliGemma(model, config, tokenizer, folder, max_batch=max_batch)
    pg.max_batch = max_batch  # checked
    try:
        for name, where in named.items():
            pg.add_adapter(name, where)
    except BaseException:
        pg.close()
        raise
    return pg
