"""Continuous batching: requests join and leave a running batch of fixed-shape slots.

One thread (`Engine.run`) owns the device and keeps it busy with a pipeline one chunk deep: it
dispatches decode chunk k+1 (`steps.decode_chunk`: up to `chunk` decode steps of every slot in one
on-device loop) before it reads chunk k's tokens, so the host work (detokenizing, stop strings,
emitting events) runs while the device computes. The decode inputs (each slot's last token and
count) never leave the device: a chunk hands them to the next, and `steps.insert_rows` writes an
admitted request's first token there. Each pass of the loop:

  1. frees the slots of cancelled requests and admits waiting ones into free slots (prefills in
     batches, prompt widths bucketed as `generate` does, batch sizes split into a few powers of
     two so that padding rows stay under 1/8; prefill and insert are dispatched, not waited on);
  2. dispatches the next chunk: `chunk` steps, or `short_chunk` steps when slots were taken or
     freed since the last dispatch and some are free (requests are arriving, or clients whose
     replies just ended may send their next: they get in within a few steps, not a whole
     chunk), ending early on the device when a slot finishes while requests wait;
  3. reads the previous chunk's tokens and the new requests' first tokens, and hands each
     request its events.

A slot that finished on the device (its budget or a stop id) idles through the chunk already in
flight; one whose stop string is found on the host is freed one chunk late, and what it made in
that chunk is discarded, never emitted (each chunk remembers the request of every slot when it was
dispatched, and only that request, unfinished, takes its tokens).

Events, in order, to the request's `emit`:

    ("prompt", token_logprobs, top)           echo + logprobs: the prompt's own log-probs
    ("delta", text, token_ids, logprobs, top) new text (held back while it may start a stop string);
                                              logprobs and top are empty unless asked for
    ("done", finish_reason, prompt_tokens, completion_tokens)
    ("error", message)

`emit` is called on the engine thread; the HTTP layer hands the events to its event loop.
`Engine.stats` counts where the engine thread's time goes (see `EngineStats`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jais2_jax.inference.generate import PROMPT_BUCKET
from jais2_jax.inference.sampling import Sampler
from jais2_jax.model.cache import init_cache
from jais2_jax.parallel import sharding
from jais2_jax.serving.steps import (
    SlotSettings,
    decode_chunk,
    insert_rows,
    prefill_rows,
    score_prompt,
)

MAX_STOP_IDS = 8
TOP_LOGPROBS = 5  # the most alternatives a request may ask for (OpenAI's completions limit)
_U32 = 0xFFFFFFFF


class QueueFull(Exception):
    """The waiting queue is full: the HTTP layer answers 503 at once."""


@dataclasses.dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[tuple], None]
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    logprobs: int | None = None  # alternatives per generated token (0..TOP_LOGPROBS)
    echo_logprobs: bool = False  # also the prompt tokens' log-probs
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: bool = False
    # host state while in a slot
    ids: list[int] = dataclasses.field(default_factory=list)  # generated tokens kept
    text: str = ""  # their text, up to `read` (sent or held back)
    sent: int = 0  # characters of `text` emitted
    prefix: int = 0  # incremental detokenizing: ids[prefix:read] decode to text's last piece
    read: int = 0
    finished: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclasses.dataclass
class EngineStats:
    """Counters of the engine thread (cheap: a few clock reads per pass).

    host_s + wait_s + idle_s is the thread's time: host_s its own work (admission, dispatch,
    detokenizing, events), wait_s blocked on the device's results (with the pipeline, the device
    runs ahead while the host works: wait_s ~ device time not overlapped), idle_s with nothing
    to do."""
    chunks: int = 0  # decode chunks dispatched
    steps: int = 0  # decode steps those chunks ran (read back)
    host_s: float = 0.0
    wait_s: float = 0.0
    idle_s: float = 0.0
    prefill_calls: int = 0
    prefill_requests: int = 0
    prefill_rows: int = 0  # rows computed, padding included
    prefill_shapes: dict = dataclasses.field(default_factory=dict)  # "rows x width" -> calls

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Chunk:
    """A dispatched decode chunk, unread: its outputs (device arrays) and each slot's request at
    dispatch (only that request may take the slot's tokens)."""
    out: jax.Array  # [N, n] int32, -1 where a slot made no token
    lp: jax.Array | None  # [N, n]; None when nobody asked for log-probs
    top_lp: jax.Array | None
    top_ids: jax.Array | None
    owners: list


@dataclasses.dataclass
class _Admitted:
    """Requests prefilled into slots, their first tokens not read yet."""
    requests: list
    slots: list
    first: tuple  # (tokens [P], log-probs [P], top log-probs / ids [P, top]) on the device


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def key_data(seed: int) -> tuple[int, int]:
    """`jax.random.key_data(jax.random.key(seed))` worked out on the host for the default
    threefry key (what every request's sampling key is): no device call, no host sync."""
    if jax.config.jax_default_prng_impl != "threefry2x32":
        return tuple(int(x) for x in np.asarray(jax.random.key_data(jax.random.key(seed))))
    high = (seed >> 32) & _U32 if jax.config.jax_enable_x64 else 0  # 32-bit seeds otherwise
    return high, seed & _U32


class Engine:
    """`slots` rows of up to `max_length` tokens over `program` (an `InferenceProgram` of batch
    `slots` and cache length `max_length`) and placed `params`.

    chunk: decode steps per dispatch; short_chunk (default chunk // 4): steps per dispatch when
    slots were taken or freed since the last one and some are free, so that the rest of a burst
    joins soon."""

    def __init__(self, program, params, tokenizer, *, max_queue: int = 64, chunk: int = 8,
                 stop_ids: tuple[int, ...] = (), short_chunk: int | None = None):
        if chunk <= 0:
            raise ValueError(f"chunk must be positive, got {chunk}")
        short_chunk = max(1, chunk // 4) if short_chunk is None else short_chunk
        if not 0 < short_chunk <= chunk:
            raise ValueError(f"short_chunk must be in [1, chunk={chunk}], got {short_chunk}")
        self.program, self.params, self.tokenizer = program, params, tokenizer
        self.model, self.config = program.model, program.config
        self.slots, self.max_length = program.batch_size, program.max_length
        self.max_queue, self.chunk, self.short_chunk = max_queue, chunk, short_chunk
        self.default_stop_ids = tuple(stop_ids)
        mesh = program.mesh
        # Prefill batches are a multiple of the batch axes' size (data * fsdp) on a mesh.
        self.row_multiple = 1 if mesh is None else int(
            mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1))
        self.waiting: collections.deque[Request] = collections.deque()
        self.owner: list[Request | None] = [None] * self.slots
        self.lock = threading.Condition()
        self.stopping = False
        self.failed: str | None = None  # why the decode loop broke (the engine serves no more)
        self.turnover = False  # slots taken or freed since the last dispatch
        n = self.slots
        # Per-slot sampling settings: kept here, uploaded when an admission changed them.
        self.temperature = np.zeros(n, np.float32)
        self.top_k = np.zeros(n, np.int32)
        self.top_p = np.ones(n, np.float32)
        self.key = np.zeros((n, 2), np.uint32)
        self.stop_table = np.full((n, MAX_STOP_IDS), -1, np.int32)
        self.budget = np.zeros(n, np.int32)
        self.device_settings: SlotSettings | None = None  # None: upload before the next chunk
        self.device_live: tuple = (None, None)  # (the live flags, them on the device)
        self.device_steps: dict = {}  # steps -> that int32 on the device
        self.cache = program.init_cache()
        # The decode inputs, on the device: each slot's last token and its count (placed as the
        # cache's lengths: made otherwise, the first insert would compile a second time).
        self.tokens = jnp.zeros_like(self.cache.lengths)
        self.counts = jnp.zeros_like(self.cache.lengths)
        self.cache_makers: dict = {}
        self.stats = EngineStats()
        # metrics (read by the HTTP layer)
        self.generated_tokens = 0
        self.cancelled = 0
        self.ttft: list[float] = []
        self.recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=256)

    # ------------------------------------------------------------------ called from other threads
    def check(self, request: Request) -> None:
        """ValueError naming the problem for a request that cannot run (the HTTP layer: 400)."""
        Sampler(request.temperature, request.top_k, request.top_p)
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        vocab = self.config.vocab_size
        bad = [t for t in request.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if request.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {request.max_tokens}")
        if n + request.max_tokens > self.max_length:
            raise ValueError(f"the prompt ({n} tokens) + max_tokens ({request.max_tokens}) = "
                             f"{n + request.max_tokens} exceeds the context ({self.max_length} "
                             "tokens)")
        if len(set(self.default_stop_ids) | set(request.stop_ids)) > MAX_STOP_IDS:
            raise ValueError(f"at most {MAX_STOP_IDS} stop token ids")
        if request.logprobs is not None and not 0 <= request.logprobs <= TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {TOP_LOGPROBS}], got {request.logprobs}")

    def submit(self, request: Request) -> None:
        """Queues a checked request; QueueFull when `max_queue` wait already."""
        self.check(request)
        with self.lock:
            if self.failed is not None:
                raise QueueFull(f"the engine failed ({self.failed}) and serves no more requests")
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests wait)")
            self.waiting.append(request)
            self.lock.notify()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()

    def wake(self) -> None:
        """Lets an idle loop look at cancellations now."""
        with self.lock:
            self.lock.notify()

    def queue_depth(self) -> int:
        return len(self.waiting)

    def live_slots(self) -> int:
        return sum(r is not None for r in self.owner)

    def tokens_per_second(self) -> float:
        """Output tokens a second over the last few seconds of chunks."""
        now = time.perf_counter()
        recent = [(t, k) for t, k in list(self.recent) if now - t < 10.0]
        if len(recent) < 2:
            return 0.0
        span = now - recent[0][0]
        return sum(k for _, k in recent[1:]) / span if span > 0 else 0.0

    def compile(self, widths=(PROMPT_BUCKET,)) -> None:
        """Compiles the steps before serving (call before `run`): the prefill of every batch
        bucket at each prompt width, the insert (rows dropped: nothing changes) and the decode
        chunk, so that first clients do not wait for compiles."""
        rows, sizes = 1, []
        while True:
            r = min(_round_up(rows, self.row_multiple), _round_up(self.slots, self.row_multiple))
            sizes.append(r)
            if r >= self.slots:
                break
            rows *= 2
        dummy = Request(prompt_ids=[0], max_tokens=1, emit=None)
        for width in widths:
            width = min(_round_up(width, PROMPT_BUCKET), self.max_length)
            for r in dict.fromkeys(sizes):
                settings = self._settings([dummy] * r)
                ids = np.zeros((r, width), np.int32)
                mask = np.zeros((r, width), np.int32)
                mask[:, 0] = 1
                drop = np.full(r, self.slots, np.int32)
                with self._context():
                    (tok, *_), new = prefill_rows(
                        self.model, self.params, jax.device_put(ids), jax.device_put(mask),
                        self._empty_cache(r, width)(), settings, top=0)
                    self.cache, self.tokens, self.counts = insert_rows(
                        self.cache, new, jax.device_put(drop), self.tokens, self.counts, tok)
        settings = self._settings([dummy] * self.slots)
        for stop_on_free in (False, True):
            with self._context():
                out = decode_chunk(self.model, self.params, self.cache, self.tokens,
                                   np.zeros(self.slots, bool), self.counts, settings,
                                   np.int32(self.chunk), n=self.chunk, top=0,
                                   stop_on_free=stop_on_free)
            self.tokens, self.counts, self.cache = out[-3:]
        jax.block_until_ready(self.cache)

    # ------------------------------------------------------------------ the engine thread
    def _context(self):
        mesh = self.program.mesh
        return sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext()

    def run(self) -> None:
        """The loop; returns once `stop()` was called and every admitted request has ended."""
        stats = self.stats
        pending: _Chunk | None = None  # dispatched, not read
        while True:
            t0 = time.perf_counter()
            with self.lock:
                while (not self.stopping and not self.waiting and pending is None
                       and self.live_slots() == 0):
                    self.lock.wait()
                if self.stopping:
                    waiting, self.waiting = list(self.waiting), collections.deque()
                else:
                    waiting = []
            t1 = time.perf_counter()
            stats.idle_s += t1 - t0
            wait0 = stats.wait_s
            for r in waiting:
                r.emit(("error", "the server is shutting down"))
            self._free_cancelled()
            if self.stopping and self.live_slots() == 0 and pending is None:
                return
            try:
                admitted = self._admit()  # a failed prefill fails its requests only
                chunk = self._dispatch() if self.live_slots() else None
                if pending is not None:
                    self._read(pending)
                for group in admitted:
                    self._read_first(group)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: the cache is gone
                self._fail(f"{type(e).__name__}: {e}")
                return
            pending = chunk
            stats.host_s += time.perf_counter() - t1 - (stats.wait_s - wait0)

    def _fail(self, why: str) -> None:
        """The decode step broke (its donated cache is lost): every request in a slot or in the
        queue gets an error at once, and later ones are refused (`failed`), instead of waiting
        on a loop that has ended."""
        with self.lock:
            self.failed = why
            waiting, self.waiting = list(self.waiting), collections.deque()
        for s, r in enumerate(self.owner):
            if r is not None:
                if not r.finished:
                    r.finished = True
                    r.emit(("error", f"the engine failed: {why}"))
                self._free(s)
        for r in waiting:
            r.finished = True
            r.emit(("error", f"the engine failed: {why}"))

    def drain(self) -> None:
        """Cancels every request in a slot (SIGTERM past its deadline)."""
        for r in self.owner:
            if r is not None:
                r.cancel()

    def _free(self, slot: int) -> None:
        self.owner[slot] = None
        self.turnover = True

    def _free_cancelled(self) -> None:
        for s, r in enumerate(self.owner):
            if r is not None and r.cancelled:
                self._finish(s, r, "cancelled")

    def _pieces(self, count: int) -> list[int]:
        """Prefill batch sizes for `count` requests: powers of two (times the row multiple) that
        add up to `count` rounded up to an eighth of its power-of-two bucket, largest first (at
        most four calls; padding rows, computed for nothing, under 1/8)."""
        m = self.row_multiple
        units = -(-count // m)
        grain = max(1, (1 << (units - 1).bit_length()) // 8)
        units = _round_up(units, grain)
        return [(1 << b) * m for b in range(units.bit_length() - 1, -1, -1) if units >> b & 1]

    def _admit(self) -> list[_Admitted]:
        free = [s for s, r in enumerate(self.owner) if r is None]
        batch = []
        with self.lock:
            while self.waiting and len(batch) < len(free):
                r = self.waiting.popleft()
                if not r.cancelled:
                    batch.append(r)
        if not batch:
            return []
        admitted, at = [], 0
        try:
            for r in batch:
                if r.echo_logprobs:
                    self._score(r)
            for rows in self._pieces(len(batch)):
                part = batch[at:at + rows]
                admitted.append(self._prefill(part, free[at:at + len(part)], rows))
                at += len(part)
        except Exception as e:  # noqa: BLE001 - fails these requests only; the others go on
            for r in batch[at:]:
                if not r.finished:
                    r.finished = True
                    r.emit(("error", f"{type(e).__name__}: {e}"))
        return admitted

    def _empty_cache(self, rows: int, width: int):
        """A jitted maker of an empty [rows, width] cache, on the cache's shardings on a mesh."""
        if (rows, width) in self.cache_makers:
            return self.cache_makers[rows, width]
        program, mesh = self.program, self.program.mesh
        shardings = None if mesh is None else sharding.cache_shardings(
            self.config, mesh, rows, width, per_layer=program.per_layer,
            quantized=program.cache_dtype == jnp.int8)
        make = jax.jit(lambda: init_cache(self.config, rows, width, program.cache_dtype,
                                          per_layer=program.per_layer), out_shardings=shardings)
        self.cache_makers[rows, width] = make
        return make

    def _settings(self, reqs: list[Request]) -> SlotSettings:
        """Host (numpy) settings of `reqs`, one row each."""
        rows = len(reqs)
        stop = np.full((rows, MAX_STOP_IDS), -1, np.int32)
        for i, r in enumerate(reqs):
            ids = sorted(set(self.default_stop_ids) | set(r.stop_ids))
            stop[i, :len(ids)] = ids
        sampler = [Sampler(r.temperature, r.top_k, r.top_p) for r in reqs]
        return SlotSettings(
            temperature=np.array([s.temperature for s in sampler], np.float32),
            top_k=np.array([s.top_k or 0 for s in sampler], np.int32),
            top_p=np.array([1.0 if s.top_p is None else s.top_p for s in sampler], np.float32),
            key=np.array([key_data(r.seed) for r in reqs], np.uint32).reshape(rows, 2),
            stop_ids=stop, budget=np.array([r.max_tokens for r in reqs], np.int32))

    def _top(self, reqs) -> int:
        wanted = any(r.logprobs is not None for r in reqs if r is not None)
        return TOP_LOGPROBS if wanted else 0

    def _score(self, r: Request) -> None:
        n = len(r.prompt_ids)
        width = min(_round_up(n, PROMPT_BUCKET), self.max_length)
        rows = self.row_multiple
        ids = np.zeros((rows, width), np.int32)
        mask = np.zeros((rows, width), np.int32)
        ids[:, :n], mask[:, :n] = r.prompt_ids, 1
        with self._context():
            lp, top_lp, top_ids = score_prompt(self.model, self.params, jax.device_put(ids),
                                               jax.device_put(mask), top=TOP_LOGPROBS)
        lp, top_lp, top_ids = (np.asarray(a)[0, :n - 1] for a in (lp, top_lp, top_ids))
        k = r.logprobs or 0
        r.emit(("prompt", [None] + lp.tolist(),
                [None] + [list(zip(i[:k].tolist(), v[:k].tolist()))
                          for i, v in zip(top_ids, top_lp)]))

    def _prefill(self, batch: list[Request], slots: list[int], rows: int) -> _Admitted:
        """Dispatches the prefill of `batch` (padded to `rows`) and its insert into `slots`."""
        count = len(batch)
        longest = max(len(r.prompt_ids) for r in batch)
        width = min(_round_up(longest, PROMPT_BUCKET), self.max_length)
        pad = self.config.pad_token_id or 0
        ids = np.full((rows, width), pad, np.int32)
        mask = np.zeros((rows, width), np.int32)
        for i, r in enumerate(batch):
            ids[i, :len(r.prompt_ids)], mask[i, :len(r.prompt_ids)] = r.prompt_ids, 1
        mask[count:, 0] = 1  # filler rows: one token, dropped on insert
        padded = batch + [batch[0]] * (rows - count)
        settings = self._settings(padded)
        target = np.array(slots + [self.slots] * (rows - count), np.int32)
        with self._context():
            new = self._empty_cache(rows, width)()
            first, new = prefill_rows(self.model, self.params, jax.device_put(ids),
                                      jax.device_put(mask), new, settings, top=self._top(batch))
            self.cache, self.tokens, self.counts = insert_rows(
                self.cache, new, jax.device_put(target), self.tokens, self.counts, first[0])
        for a in first:
            a.copy_to_host_async()
        stats = self.stats
        stats.prefill_calls += 1
        stats.prefill_requests += count
        stats.prefill_rows += rows
        shape = f"{rows}x{width}"
        stats.prefill_shapes[shape] = stats.prefill_shapes.get(shape, 0) + 1
        for i, (r, s) in enumerate(zip(batch, slots)):
            self.owner[s] = r
            for name in ("temperature", "top_k", "top_p", "key", "budget"):
                getattr(self, name)[s] = getattr(settings, name)[i]
            self.stop_table[s] = settings.stop_ids[i]
        self.device_settings = None
        self.turnover = True
        return _Admitted(batch, slots, first)

    def _read_first(self, group: _Admitted) -> None:
        """The first tokens of admitted requests (after the chunk behind them was dispatched)."""
        t = time.perf_counter()
        try:
            tok, lp, top_lp, top_ids = (np.asarray(a) for a in group.first)
        except Exception as e:  # noqa: BLE001 - fails these requests; a broken cache fails the
            for s, r in zip(group.slots, group.requests):  # next chunk (all of them)
                if not r.finished:
                    r.finished = True
                    r.emit(("error", f"{type(e).__name__}: {e}"))
                if self.owner[s] is r:
                    self._free(s)
            return
        finally:
            self.stats.wait_s += time.perf_counter() - t
        now = time.perf_counter()
        for i, (r, s) in enumerate(zip(group.requests, group.slots)):
            if self.owner[s] is not r:
                continue
            self.ttft.append(now - r.submitted)
            self._take(s, r, [int(tok[i])], lp[i:i + 1].tolist(), top_lp[i:i + 1],
                       top_ids[i:i + 1])
        self.ttft = self.ttft[-1000:]

    def _dispatch(self) -> _Chunk:
        """Dispatches the next decode chunk (not waited on): `short_chunk` steps when slots
        changed hands since the last one and some are free, else `chunk`."""
        live = tuple(r is not None for r in self.owner)
        with self.lock:
            waiting = bool(self.waiting)
        steps = self.short_chunk if self.turnover and not all(live) else self.chunk
        self.turnover = False
        top = self._top(self.owner)
        # The small inputs go to the device only when they change (each upload is a copy).
        if self.device_settings is None:
            self.device_settings = SlotSettings(*(jax.device_put(a.copy()) for a in (
                self.temperature, self.top_k, self.top_p, self.key, self.stop_table,
                self.budget)))
        if self.device_live[0] != live:
            self.device_live = (live, jax.device_put(np.array(live, bool)))
        if steps not in self.device_steps:
            self.device_steps[steps] = jax.device_put(np.int32(steps))
        with self._context():
            out, lp, top_lp, top_ids, self.tokens, self.counts, self.cache = decode_chunk(
                self.model, self.params, self.cache, self.tokens, self.device_live[1],
                self.counts, self.device_settings, self.device_steps[steps], n=self.chunk,
                top=top, stop_on_free=waiting)
        chunk = _Chunk(out, lp, top_lp, top_ids, list(self.owner)) if top else \
            _Chunk(out, None, None, None, list(self.owner))
        for a in (out, lp, top_lp, top_ids) if top else (out,):
            a.copy_to_host_async()  # the copy starts as soon as the chunk ends
        self.stats.chunks += 1
        return chunk

    def _read(self, chunk: _Chunk) -> None:
        """A chunk's tokens to the requests that were in its slots when it was dispatched."""
        t = time.perf_counter()
        out = np.asarray(chunk.out)
        if chunk.lp is not None:
            lp, top_lp, top_ids = (np.asarray(a) for a in (chunk.lp, chunk.top_lp,
                                                           chunk.top_ids))
        self.stats.wait_s += time.perf_counter() - t
        made = out >= 0
        self.stats.steps += int(made.any(axis=0).sum())
        counts = made.sum(axis=1).tolist()
        total = sum(counts)
        self.generated_tokens += total
        self.recent.append((time.perf_counter(), total))
        rows = out.tolist()
        for s, r in enumerate(chunk.owners):
            k = counts[s]
            if r is None or not k or r.finished or self.owner[s] is not r:
                continue  # a slot freed (or refilled) after the chunk was dispatched
            if chunk.lp is None:
                self._take(s, r, rows[s][:k], (), (), ())
            else:
                self._take(s, r, rows[s][:k], lp[s, :k].tolist(), top_lp[s, :k],
                           top_ids[s, :k])

    # ------------------------------------------------------------------ text
    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _extend_text(self, r: Request, flush: bool) -> None:
        """Appends the text of r.ids[r.read:] to r.text, decoding only a window of the last
        tokens (`ids[prefix:read]` gave the last piece; the text of `ids[prefix:]` past it is
        new): incremental, as text-generation-inference and vLLM do. An incomplete UTF-8
        character at the end waits for the next tokens, unless `flush` (the reply ends)."""
        if r.read == len(r.ids):
            return
        head = self._decode(r.ids[r.prefix:r.read])
        whole = self._decode(r.ids[r.prefix:])
        if len(whole) > len(head) and (flush or not whole.endswith("\ufffd")):
            r.text += whole[len(head):]
            r.prefix, r.read = r.read, len(r.ids)

    def _text_until(self, r: Request, prefix: int, read: int, text_len: int, end: int) -> int:
        """The length of the reply's text over ids[:end], from the window (prefix, read) that
        held when the text was `text_len` long."""
        head = self._decode(r.ids[prefix:read])
        return text_len + max(0, len(self._decode(r.ids[prefix:end])) - len(head))

    def _take(self, slot: int, r: Request, new: list[int], lps, top_lp, top_ids):
        """A slot's new tokens: stop ids, max_tokens, stop strings; emits the new text."""
        if r.finished:
            return
        if r.cancelled:
            self._finish(slot, r, "cancelled")
            return
        stops = set(self.default_stop_ids) | set(r.stop_ids)
        reason = None
        keep = len(new)
        for i, t in enumerate(new):
            if t in stops:
                reason, keep = "stop", i
                break
            if len(r.ids) + i + 1 >= r.max_tokens:
                reason, keep = "length", i + 1
                break
        base, prefix, read, checked = len(r.ids), r.prefix, r.read, len(r.text)
        r.ids.extend(new[:keep])
        self._extend_text(r, flush=reason is not None)
        text = r.text
        match = None
        for s in r.stop_strings:  # only where a new match can be: ending in the new text
            at = text.find(s, max(0, checked - len(s) + 1))
            if at >= 0 and (match is None or at < match[0]):
                match = (at, s)
        if match is not None:
            at, s = match
            reason = "stop"
            # Tokens past the one that completed the stop string are dropped (not counted, no
            # log-probs): the reply is what the text says.
            for j in range(1, keep + 1):
                if self._text_until(r, prefix, read, checked, base + j) >= at + len(s):
                    keep = j
                    break
            del r.ids[base + keep:]
            r.text = text = text[:at]
            end = at
        elif reason is None:
            # Held back: a tail that may begin a stop string.
            hold = 0
            for s in r.stop_strings:
                for j in range(min(len(s) - 1, len(text) - r.sent), hold, -1):
                    if text.endswith(s[:j]):
                        hold = j
                        break
            end = len(text) - hold
        else:
            end = len(text)
        delta = text[r.sent:end] if end > r.sent else ""
        if delta or keep:
            r.sent += len(delta)
            if r.logprobs is None:
                r.emit(("delta", delta, new[:keep], [], []))
            else:
                k = r.logprobs
                alts = [list(zip(i[:k].tolist(), v[:k].tolist()))
                        for i, v in zip(top_ids[:keep], top_lp[:keep])]
                r.emit(("delta", delta, new[:keep], list(lps[:keep]), alts))
        if reason is not None:
            self._finish(slot, r, reason)

    def _finish(self, slot: int, r: Request, reason: str) -> None:
        if reason == "cancelled":
            self.cancelled += 1
        if not r.finished:
            r.finished = True
            r.emit(("done", reason, len(r.prompt_ids), len(r.ids)))
        self._free(slot)


def percentile(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan
