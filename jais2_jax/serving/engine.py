"""Continuous batching: requests join and leave a running batch of fixed-shape slots.

One thread (`Engine.run`) owns the device: between decode chunks it frees the slots of finished or
cancelled requests, prefills waiting requests (in batches, prompt widths bucketed as `generate`
does) and inserts their cache rows into free slots; then it runs a chunk of decode steps of every
slot on the device (`steps.decode_chunk`: up to `chunk` steps per host sync, ending early when a
slot frees while requests wait) and reads back only the new tokens. Text, stop strings and
finish reasons are worked out on the host, and each request's `emit` gets its events:

    ("prompt", token_logprobs, top)           echo + logprobs: the prompt's own log-probs
    ("delta", text, token_ids, logprobs, top) new text (held back while it may start a stop string)
    ("done", finish_reason, prompt_tokens, completion_tokens)
    ("error", message)

`emit` is called on the engine thread; the HTTP layer hands the events to its event loop.
"""

from __future__ import annotations

import collections
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
    ids: list[int] = dataclasses.field(default_factory=list)
    sent: str = ""
    finished: bool = False

    def cancel(self) -> None:
        self.cancelled = True


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class Engine:
    """`slots` rows of up to `max_length` tokens over `program` (an `InferenceProgram` of batch
    `slots` and cache length `max_length`) and placed `params`."""

    def __init__(self, program, params, tokenizer, *, max_queue: int = 64, chunk: int = 8,
                 stop_ids: tuple[int, ...] = ()):
        self.program, self.params, self.tokenizer = program, params, tokenizer
        self.model, self.config = program.model, program.config
        self.slots, self.max_length = program.batch_size, program.max_length
        self.max_queue, self.chunk = max_queue, chunk
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
        n = self.slots
        self.tokens = np.zeros(n, np.int32)
        self.counts = np.zeros(n, np.int32)
        self.temperature = np.zeros(n, np.float32)
        self.top_k = np.zeros(n, np.int32)
        self.top_p = np.ones(n, np.float32)
        self.key = np.zeros((n, 2), np.uint32)
        self.stop_table = np.full((n, MAX_STOP_IDS), -1, np.int32)
        self.budget = np.zeros(n, np.int32)
        self.cache = program.init_cache()
        self.cache_makers: dict = {}
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
        bucket at each prompt width, the insert (rows dropped: the cache is unchanged) and the
        decode chunk, so that first clients do not wait for compiles."""
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
                with self._context():
                    _, new = prefill_rows(self.model, self.params, jnp.asarray(ids),
                                          jnp.asarray(mask), self._empty_cache(r, width)(),
                                          settings, top=0)
                    self.cache = insert_rows(self.cache, new,
                                             jnp.full((r,), self.slots, jnp.int32))
        settings = self._settings([dummy] * self.slots)
        settings.budget[:] = 0
        for stop_on_free in (False, True):
            with self._context():
                out = decode_chunk(self.model, self.params, self.cache, self.tokens,
                                   np.zeros(self.slots, bool), self.counts, settings,
                                   n=self.chunk, top=0, stop_on_free=stop_on_free)
            self.cache = out[-1]
        jax.block_until_ready(self.cache)

    # ------------------------------------------------------------------ the engine thread
    def _context(self):
        import contextlib
        mesh = self.program.mesh
        return sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext()

    def run(self) -> None:
        """The loop; returns once `stop()` was called and every admitted request has ended."""
        while True:
            with self.lock:
                while not self.stopping and not self.waiting and self.live_slots() == 0:
                    self.lock.wait()
                if self.stopping:
                    waiting, self.waiting = list(self.waiting), collections.deque()
                else:
                    waiting = []
            for r in waiting:
                r.emit(("error", "the server is shutting down"))
            self._free_cancelled()
            if self.stopping and self.live_slots() == 0:
                return
            self._admit()
            if self.live_slots():
                try:
                    self._decode()
                except Exception as e:  # noqa: BLE001 - e.g. out of memory: the cache is gone
                    self._fail(f"{type(e).__name__}: {e}")
                    return

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
        self.budget[slot] = 0

    def _free_cancelled(self) -> None:
        for s, r in enumerate(self.owner):
            if r is not None and r.cancelled:
                self._finish(s, r, "cancelled")

    def _admit(self) -> None:
        free = [s for s, r in enumerate(self.owner) if r is None]
        batch = []
        with self.lock:
            while self.waiting and len(batch) < len(free):
                r = self.waiting.popleft()
                if not r.cancelled:
                    batch.append(r)
        if not batch:
            return
        try:
            for r in batch:
                if r.echo_logprobs:
                    self._score(r)
            self._prefill(batch, free[:len(batch)])
        except Exception as e:  # noqa: BLE001 - fails these requests only; the others go on
            for r in batch:
                if not r.finished:
                    r.finished = True
                    r.emit(("error", f"{type(e).__name__}: {e}"))
            for s in free[:len(batch)]:
                if self.owner[s] in batch:
                    self._free(s)

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
            key=np.stack([np.asarray(jax.random.key_data(jax.random.key(r.seed)), np.uint32)
                          for r in reqs]),
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
            lp, top_lp, top_ids = score_prompt(self.model, self.params, jnp.asarray(ids),
                                               jnp.asarray(mask), top=TOP_LOGPROBS)
        lp, top_lp, top_ids = (np.asarray(a)[0, :n - 1] for a in (lp, top_lp, top_ids))
        k = r.logprobs or 0
        r.emit(("prompt", [None] + lp.tolist(),
                [None] + [list(zip(i[:k].tolist(), v[:k].tolist()))
                          for i, v in zip(top_ids, top_lp)]))

    def _prefill(self, batch: list[Request], slots: list[int]) -> None:
        count = len(batch)
        rows = min(_round_up(1 << (count - 1).bit_length(), self.row_multiple),
                   _round_up(self.slots, self.row_multiple))
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
        top = self._top(batch)
        with self._context():
            new = self._empty_cache(rows, width)()
            (tok, lp, top_lp, top_ids), new = prefill_rows(
                self.model, self.params, jnp.asarray(ids), jnp.asarray(mask), new, settings,
                top=top)
            self.cache = insert_rows(self.cache, new, jnp.asarray(target))
        tok, lp, top_lp, top_ids = (np.asarray(a) for a in (tok, lp, top_lp, top_ids))
        now = time.perf_counter()
        for i, (r, s) in enumerate(zip(batch, slots)):
            self.owner[s] = r
            for name in ("temperature", "top_k", "top_p", "key", "budget"):
                getattr(self, name)[s] = getattr(settings, name)[i]
            self.stop_table[s] = settings.stop_ids[i]
            self.tokens[s], self.counts[s] = tok[i], 1
            self.ttft.append(now - r.submitted)
            self._take(s, r, [int(tok[i])], [float(lp[i])], top_lp[i:i + 1], top_ids[i:i + 1])
        self.ttft = self.ttft[-1000:]

    def _decode(self) -> None:
        live = np.array([r is not None for r in self.owner])
        settings = SlotSettings(self.temperature, self.top_k, self.top_p, self.key, self.stop_table,
                                self.budget)
        with self.lock:
            waiting = bool(self.waiting)
        with self._context():
            out, lp, top_lp, top_ids, tokens, counts, self.cache = decode_chunk(
                self.model, self.params, self.cache, self.tokens, live, self.counts, settings,
                n=self.chunk, top=self._top(self.owner), stop_on_free=waiting)
        out, lp, top_lp, top_ids = (np.asarray(a) for a in (out, lp, top_lp, top_ids))
        self.tokens, self.counts = np.array(tokens), np.array(counts)
        made = int((out >= 0).sum())
        self.generated_tokens += made
        self.recent.append((time.perf_counter(), made))
        for s, r in enumerate(self.owner):
            if r is None:
                continue
            steps = out[s] >= 0
            if steps.any():
                self._take(s, r, out[s][steps].tolist(), lp[s][steps].tolist(), top_lp[s][steps],
                           top_ids[s][steps])

    def _take(self, slot: int, r: Request, new: list[int], lps: list[float], top_lp, top_ids):
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
        r.ids.extend(new[:keep])
        text = self.tokenizer.decode(r.ids, skip_special_tokens=True)
        for s in r.stop_strings:
            at = text.find(s)
            if at >= 0:
                text, reason = text[:at], "stop"
        if reason is None:
            hold = max((len(s) - 1 for s in r.stop_strings), default=0)
            # Held back: an incomplete UTF-8 character, and a tail that may begin a stop string.
            end = len(text)
            while end > len(r.sent) and text[end - 1] == "\ufffd":
                end -= 1
            for s in r.stop_strings:
                for j in range(min(hold, end), 0, -1):
                    if text[:end].endswith(s[:j]):
                        end = min(end, len(text[:end]) - j)
                        break
            text = text[:max(end, len(r.sent))]
        k = r.logprobs or 0
        alts = [list(zip(i[:k].tolist(), v[:k].tolist())) for i, v in zip(top_ids[:keep],
                                                                             top_lp[:keep])]
        if text.startswith(r.sent):
            delta = text[len(r.sent):]
        else:  # a re-segmentation changed earlier text; keep what was sent
            delta = ""
        if delta or keep:
            r.sent += delta
            r.emit(("delta", delta, new[:keep], lps[:keep], alts))
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
