"""Continuous batching: concurrent generations decode together, one row each.

A request (`Request`: prompt ids, pixels, adapter slot, sampling, max_tokens) is prepared on
the model's worker and handed to the `Scheduler` (pg_edge/scheduler.py), which runs the batch
(`Batch`, here) as a worker job (pg_edge.worker) that steps while there is work and hands the
worker over whenever another model call waits (image features, adapters added or removed, a
mask decoder): those run between two steps, at a token boundary. Each step:

1. admits waiting requests, in arrival order, up to `max_batch` rows: they are prefilled
   together, left-padded to the longest (image features, those not cached yet encoded in one
   vision pass, each row with its own adapter), and their KV caches join the batch's,
   left-padded to the longer (requests that arrive together join in one pass: the Scheduler
   holds an idle batch's first step for announced requests, pg_edge/scheduler.py);
2. hands every row its next token (a Chunk on the row's channel) and retires the rows that
   ended: eos ("stop"), max_tokens ("length"), or cancelled (the caller closed or cancelled
   its stream, a `cancel` event was set, or `PaliGemma.cancel()`); the batch's caches drop
   those rows and any leading columns that only padding uses now;
3. decodes one token for every remaining row: the base weights' products once for the batch,
   each row's LoRA delta with its own adapter (pg_edge.multi_lora), each row's rotary position
   its own, the decode mask built from every key's validity (so Gemma2's sliding windows and
   the bidirectional prefix are right per row).

Caches are mlx-lm's KVCache, or its QuantizedKVCache with `kv_bits=8` (every key kept): a row
joining or leaving rebuilds them in place. Greedy rows take the argmax of the raw logits;
sampled rows use their own Sampling.
A row computes the same operations whatever else is in the batch (masked keys add exact
zeros), so greedy results equal the request run alone.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .generate import Chunk, Detokenizer, GenerationResult, Sampling, vocab_mask
from .worker import _DONE, _Job


@dataclass(eq=False)
class Request:
    ids: np.ndarray  # int[T], no padding
    pixels: np.ndarray  # float32[S, S, 3]
    adapter: str | None
    sampling: Sampling
    max_tokens: int
    cancel: object | None = None  # an Event-like (is_set) the caller may set
    channel: _Job = field(default_factory=lambda: _Job(None, streaming=True))
    # set at admission
    slot: int = 0
    pos: int = 0  # position of the next token fed to the model
    next_token: int = -1
    tokens: list = field(default_factory=list)
    detok: Detokenizer | None = None
    t_submit: float = 0.0  # time.monotonic() when handed to the Scheduler
    t_admit: float = 0.0
    t_first: float = 0.0
    vision_s: float = 0.0

    def stopped(self) -> bool:
        return self.channel.cancel.is_set() or (self.cancel is not None and self.cancel.is_set())

    def fail(self, err: BaseException) -> None:
        self.channel.out.put((_DONE, err))


class Batch:
    """The rows decoding together and their KV caches; used on the worker thread only."""

    def __init__(self, pg):
        self.pg = weakref.proxy(pg)  # no cycle: a dropped PaliGemma is freed at once
        self.model = pg.model
        self.rows: list[Request] = []
        self.caches: list | None = None  # mlx-lm KVCache per decoder layer
        self.valid = np.zeros((0, 0), dtype=bool)  # [B, S] which cached keys are real
        self.limit = self.model.config.real_vocab_size
        self._bias = None
        # What the rows are handed, sent by flush() once the step's work is done (a caller
        # that has its result then finds the worker no longer using the model's objects).
        self.outbox: list[tuple[_Job, object]] = []

    def flush(self) -> None:
        out, self.outbox = self.outbox, []
        for channel, item in out:
            channel.out.put(item)

    def bias(self, V: int) -> mx.array:
        if self._bias is None or self._bias.shape[0] != V:
            self._bias = vocab_mask(V, self.limit)
        return self._bias

    # -- 1. join -----------------------------------------------------------------------------
    def admit(self, reqs: list[Request]) -> None:
        """Prefill `reqs` together (left-padded to the longest, each row with its own image
        features and adapter) and add their rows; each row's first token is its `next_token`."""
        pg = self.pg
        t0 = time.perf_counter()
        for req in reqs:
            req.t_admit = t0
            req.slot = pg._bank.slot(req.adapter) if pg._bank is not None else 0
            if req.sampling.seed is not None:
                mx.random.seed(int(req.sampling.seed))
        feats = pg._features(np.stack([r.pixels for r in reqs]), [r.adapter for r in reqs])
        vision_s = time.perf_counter() - t0
        T = max(len(r.ids) for r in reqs)
        ids = np.full((len(reqs), T), pg.tokenizer.pad_id, dtype=np.int32)
        valid = np.zeros((len(reqs), T), dtype=bool)
        for i, r in enumerate(reqs):
            ids[i, T - len(r.ids):], valid[i, T - len(r.ids):] = r.ids, True
        cache = self.model.make_cache(padded=True)  # every key kept: rows join and leave
        pg._route([r.slot for r in reqs])
        logits = self.model(mx.array(ids), image_features=feats, valid=mx.array(valid), cache=cache,
                            last_only=True, capped=False)[:, -1]
        first = self._sample(logits, reqs)
        t1 = time.perf_counter()
        for r, t in zip(reqs, first):
            r.next_token, r.t_first, r.vision_s = t, t1, vision_s
            r.pos, r.detok = len(r.ids), Detokenizer(pg.tokenizer)
        self._join(reqs, cache, valid)

    def _join(self, reqs: list[Request], cache: list, valid: np.ndarray) -> None:
        """Add rows whose caches hold `valid`'s columns (bool[b, T], left-padded)."""
        S, T = self.valid.shape[1], valid.shape[1]
        S2 = max(S, T)
        new_valid = np.zeros((len(reqs), S2), dtype=bool)
        new_valid[:, S2 - T:] = valid
        if self.caches is None or not self.rows:
            self.caches, self.valid = cache, new_valid
        else:
            for c, new in zip(self.caches, cache):
                k, v = (_kv(lambda a: _left_pad(a[..., :c.offset, :], S2), t) for t in (c.keys, c.values))
                nk, nv = (_kv(lambda a: _left_pad(a[..., :new.offset, :], S2), t) for t in (new.keys, new.values))
                c.keys, c.values = (_kv2(lambda a, b: mx.concatenate([a, b]), o, n) for o, n in ((k, nk), (v, nv)))
                c.offset = S2
            old = np.zeros((self.valid.shape[0], S2), dtype=bool)
            old[:, S2 - S:] = self.valid
            self.valid = np.concatenate([old, new_valid])
        self.rows.extend(reqs)

    # -- 2. hand out tokens, retire rows -----------------------------------------------------
    def emit(self) -> None:
        keep = []
        for i, r in enumerate(self.rows):
            t = r.next_token
            if r.stopped():
                self._finish(r, "cancelled")
            elif t == self.pg.tokenizer.eos_id:
                self._finish(r, "stop")
            else:
                r.tokens.append(t)
                piece = r.detok.add_token(t)
                if piece:
                    self.outbox.append((r.channel, Chunk(piece, t)))
                if len(r.tokens) >= r.max_tokens:
                    self._finish(r, "length")
                else:
                    keep.append(i)
        if len(keep) < len(self.rows):
            self._keep(keep)

    def _finish(self, r: Request, reason: str) -> None:
        t_end = time.perf_counter()
        tail = r.detok.finalize()
        result = GenerationResult(
            text=r.detok.text, tokens=r.tokens, prompt_tokens=len(r.ids), finish_reason=reason,
            prompt_seconds=r.t_first - r.t_admit - r.vision_s, generation_seconds=t_end - r.t_first,
            vision_seconds=r.vision_s, peak_memory_gb=mx.get_peak_memory() / 1e9)
        self.outbox += [(r.channel, Chunk(tail, None, result)), (r.channel, _DONE)]

    def _keep(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.caches, self.valid = None, np.zeros((0, 0), dtype=bool)
            return
        valid = self.valid[keep]
        lead = int(np.argmax(valid.any(axis=0)))  # columns only padding uses now
        idx = mx.array(keep, dtype=mx.int32)
        for c in self.caches:
            c.keys, c.values = (_kv(lambda a: a[..., lead:c.offset, :][idx], t) for t in (c.keys, c.values))
            c.offset -= lead
        self.valid = valid[:, lead:]

    def cancel_all(self) -> bool:
        for r in self.rows:
            r.channel.cancel.set()
        return bool(self.rows)

    def fail_all(self, err: BaseException) -> None:
        for r in self.rows:
            self.outbox.append((r.channel, (_DONE, err)))
        self.rows, self.caches, self.valid = [], None, np.zeros((0, 0), dtype=bool)

    # -- 3. one decode step --------------------------------------------------------------------
    def decode(self) -> None:
        B = len(self.rows)
        self.valid = np.concatenate([self.valid, np.ones((B, 1), dtype=bool)], axis=1)
        tokens = mx.array([[r.next_token] for r in self.rows], dtype=mx.int32)
        offset = mx.array([r.pos for r in self.rows], dtype=mx.int32)
        self.pg._route([r.slot for r in self.rows])
        logits = self.model.step(tokens, mx.array(self.valid), offset, self.caches, capped=False)[:, -1]
        for r, t in zip(self.rows, self._sample(logits, self.rows)):
            r.next_token = t
            r.pos += 1

    def _sample(self, logits: mx.array, rows: list[Request]) -> list[int]:
        """float[B, V] raw (uncapped) logits -> one token per row, by the row's sampling."""
        lg = logits.astype(mx.float32) + self.bias(logits.shape[-1])
        greedy = mx.argmax(lg, axis=-1)
        picks = []
        for i, r in enumerate(rows):
            if r.sampling.temperature == 0:
                picks.append(None)
                continue
            logprobs = self.model.log_probs(logits[i:i + 1], self.limit, self.bias(lg.shape[-1]))
            tok = r.sampling.sampler(self.limit)(logprobs)
            picks.append(mx.where(tok < self.limit, tok, greedy[i:i + 1]))
        out = greedy.tolist()
        for i, p in enumerate(picks):
            if p is not None:
                out[i] = int(p.item())
        return out

    def step(self, admit: list[Request]) -> None:
        """Admit `admit`, hand out tokens, decode the next one (what one worker job does)."""
        admit = [r for r in admit if not _closed(r)]  # dropped by their callers while waiting
        if admit:
            try:
                self.admit(admit)
            except Exception:  # one request's own problem (a removed adapter...): each alone
                for req in admit:
                    try:
                        self.admit([req])
                    except Exception as err:  # the batch goes on without it
                        self.outbox.append((req.channel, (_DONE, err)))
        self.emit()
        if self.rows:
            self.decode()


def _closed(req: Request) -> bool:
    return getattr(req, "_abandoned", False)


def _kv(f, t):
    """f over a cache's keys or values: one array (KVCache), or the (packed, scales, biases)
    triple of mlx-lm's QuantizedKVCache (`pg_edge.load(kv_bits=8)`), each [B, H, S, *]."""
    return tuple(f(a) for a in t) if isinstance(t, tuple) else f(t)


def _kv2(f, t, u):
    return tuple(f(a, b) for a, b in zip(t, u)) if isinstance(t, tuple) else f(t, u)


def _left_pad(a: mx.array, S: int) -> mx.array:
    """[B, H, s, d] -> [B, H, S, d] with zeros in front."""
    pad = S - a.shape[2]
    return mx.pad(a, [(0, 0), (0, 0), (pad, 0), (0, 0)]) if pad else a


def run_alone(pg, req: Request):
    """On the worker itself (a model call made from inside another one): the request as a
    batch of its own; yields its Chunks."""
    batch = Batch(pg)
    batch.admit([req])
    while batch.rows:
        if pg._worker.cancelled():
            req.channel.cancel.set()
        batch.emit()
        batch.flush()
        yield from _drain(req)
        if batch.rows:
            batch.decode()
    yield from _drain(req)


def _drain(req: Request):
    while not req.channel.out.empty():
        item = req.channel.out.get()
        if item is _DONE:
            return
        if isinstance(item, tuple) and item[0] is _DONE:
            raise item[1]
        yield item


__all__ = ["Request", "Batch", "run_alone"]
