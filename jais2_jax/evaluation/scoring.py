"""Log-likelihoods of continuations, and generation with stop strings: the device side of the
lm-evaluation-harness model (`evaluation/lm.py`).

Two ways to score a request (context, continuation):
- `score` runs the decoder once over a batch of right-padded rows (context + continuation, the
  last token dropped, as lm-eval's `hf` model feeds them) and, for each request, gathers the hidden
  states at its continuation's positions. Requests with the same input (multiple choice with
  one-token answers: the same input, different last targets) share one row.
- Requests that share a context (the answers of a multiple-choice question) forward it once:
  `score_packed` runs rows that hold questions, each a context followed by all of its answers
  (as many questions a row as fit), with a mask that lets each answer see its context and itself,
  nothing else, and positions that go on from the context's end for every answer. That is the
  same function of the same tokens as the one-row forward, in one large forward per batch (no KV
  cache, no small calls per answer).
Either way the float32 logits are made only at target positions, a chunk of positions at a time
(so a 4k-token rolling window never holds [rows, 4k, 150k] float32 at once); the result per
request is the summed log-probability of its targets and whether greedy decoding would have
produced them.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jais2_jax.inference.generate import decode_loop, decode_step, prefill, right_align
from jais2_jax.inference.sampling import Sampler
from jais2_jax.model.cache import init_cache, put_rows
from jais2_jax.parallel.sharding import use_mesh

Array = jax.Array
# The most float32 logits one chunk of `score` may hold, in bytes (rows x positions x vocab x 4).
LOGITS_BYTES = 1 << 30


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def bucket_length(n: int, shortest: int = 64) -> int:
    """Padded input length: `shortest`, then two sizes per octave (a handful of compiled shapes,
    at most a third of a row padding)."""
    if n <= shortest:
        return shortest
    step = max(shortest, next_pow2(n) // 4)
    return -(-n // step) * step


def logits_chunk(rows: int, positions: int, vocab: int) -> int:
    """Positions per logits chunk: a power of two dividing `positions` (a power of two)."""
    k = positions
    while k > 1 and rows * k * vocab * 4 > LOGITS_BYTES:
        k //= 2
    return k


def _target_logprobs(model, params, picked: Array, targets: Array, target_mask: Array,
                     chunk: int) -> tuple[Array, Array]:
    """picked [R, C, D] hidden states predicting targets [R, C] (target_mask: 1 for real ones):
    (summed float32 log-probs [R], all greedy [R]), the logits made `chunk` positions at a time."""
    num, width = targets.shape

    def one(args):
        h, t = args  # [R, K, D], [R, K]
        logits = model.apply({"params": params}, h, method="logits")  # [R, K, V] float32
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        token_logp = jnp.take_along_axis(logp, t[..., None], axis=-1)[..., 0]  # [R, K]
        return token_logp, jnp.argmax(logits, axis=-1) == t

    n = width // chunk
    split = lambda x: jnp.moveaxis(x.reshape(num, n, chunk, *x.shape[2:]), 1, 0)
    token_logp, greedy = jax.lax.map(one, (split(picked), split(targets)))  # [n, R, K]
    token_logp = jnp.moveaxis(token_logp, 0, 1).reshape(num, width)
    greedy = jnp.moveaxis(greedy, 0, 1).reshape(num, width)
    real = target_mask.astype(bool)
    return (jnp.where(real, token_logp, 0.0).sum(axis=1),
            jnp.all(greedy | ~real, axis=1))


@functools.partial(jax.jit, static_argnames=("model", "chunk"))
def score(model, params, input_ids: Array, attention_mask: Array, rows: Array, picks: Array,
          targets: Array, target_mask: Array, *, chunk: int) -> tuple[Array, Array]:
    """input_ids, attention_mask: [B, T] right-padded; per request r (R of them): rows [R] (its
    row of the batch), picks [R, C] (the slots whose hidden states predict its targets), targets
    [R, C] and target_mask [R, C] (1 for real targets, a prefix of each row).

    Returns (sum of float32 log-probs of the targets [R], all targets greedy [R])."""
    del attention_mask  # right padding: causal attention keeps it out of every real position
    # No key mask: then the GPU's fused (cuDNN) causal kernel runs, not a dense masked softmax.
    hidden, _ = model.apply({"params": params}, input_ids, method="hidden_states")  # [B, T, D]
    return _target_logprobs(model, params, hidden[rows[:, None], picks], targets, target_mask,
                            chunk)


@functools.partial(jax.jit, static_argnames=("model", "chunk"))
def score_packed(model, params, input_ids: Array, positions: Array, docs: Array, parts: Array,
                 rows: Array, picks: Array, targets: Array, target_mask: Array, *,
                 chunk: int) -> tuple[Array, Array]:
    """Rows that each hold one or more questions, each a shared context and then its answers:
    input_ids, positions, docs, parts [B, T]. docs numbers the questions of a row from 1 (0 is
    padding); parts is 0 for a question's context and 1, 2, ... for its answers. A token sees the
    earlier tokens of its own answer and of its question's context, nothing of another answer or
    question, and an answer's positions go on from its context's end: the same function of the
    same tokens as one row per request. rows, picks, targets, target_mask as for `score` (an
    answer's picks: its context's last slot, then its own tokens).

    Returns (sum of float32 log-probs of the targets [R], all targets greedy [R])."""
    same_doc = docs[:, :, None] == docs[:, None, :]
    part_q, part_k = parts[:, :, None], parts[:, None, :]
    visible = same_doc & ((part_k == 0) | (part_k == part_q))  # [B, T, T], causal on top
    hidden, _ = model.apply({"params": params}, input_ids, visible, positions=positions,
                            method="hidden_states")  # [B, T, D]
    return _target_logprobs(model, params, hidden[rows[:, None], picks], targets, target_mask,
                            chunk)


# Rows a prefill of `generate_with_stops` takes at once (when the batch is a multiple of it).
PREFILL_ROWS = 32
# A prefill group's width is its longest prompt rounded up to 1 / GROUP_PARTS of its octave.
GROUP_PARTS = 8


def _group_width(n: int) -> int:
    """A prefill group's width: n rounded up to a GROUP_PARTS-th of its octave (at least 16)."""
    step = max(16, next_pow2(n) // GROUP_PARTS)
    return -(-n // step) * step


@functools.partial(jax.jit, donate_argnames=("cache",))
def _put_rows(cache, new, slots):
    return put_rows(cache, new, slots)


def mesh_context(mesh):
    return use_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def generate_with_stops(model, params, prompts: list[list[int]], *, max_new_tokens: int,
                        eos_ids: tuple[int, ...], pad_id: int, stop_when, chunk: int = 32,
                        sampler: Sampler | None = None, rng=None,
                        mesh=None) -> list[list[int]]:
    """Greedy (or sampled) continuations of token-id prompts, decoded `chunk` tokens at a time so
    that the batch stops once `stop_when(row, tokens)` holds for every row (a stop string in its
    text) or every row met an EOS, rather than always running `max_new_tokens` steps.

    Returns each row's new tokens, cut before its first EOS (at most `max_new_tokens`)."""
    config = model.config
    sampler = Sampler() if sampler is None else sampler
    batch = len(prompts)
    longest = max(len(p) for p in prompts)
    needed = longest + max_new_tokens - 1  # the last new token is never written to the cache
    if needed > config.max_position_embeddings:
        raise ValueError(f"prompt ({longest} tokens) + {max_new_tokens} new tokens exceed the "
                         f"model's {config.max_position_embeddings} positions")
    cache_length = min(-(-max(needed, 1) // 128) * 128, config.max_position_embeddings)
    # Longest first, prefilled PREFILL_ROWS rows at a time, each group as wide as its own longest
    # prompt (one width for the whole batch would pad the short prompts to the longest).
    order = sorted(range(batch), key=lambda i: (-len(prompts[i]), i))
    group = PREFILL_ROWS if mesh is None and batch % PREFILL_ROWS == 0 else batch
    if rng is None:
        rng = jax.random.key(0)
    out: list[list[int]] = [[] for _ in range(batch)]  # in `order`
    finished = np.zeros(batch, bool)
    eos = set(eos_ids)
    with mesh_context(mesh):
        cache = init_cache(config, batch, cache_length, dtype=model.dtype,
                           per_layer=not model.scan_layers)
        logits = []
        for at in range(0, batch, group):
            rows = order[at:at + group]
            longest = len(prompts[rows[0]])
            width = min(bucket_length(longest) if group == batch else _group_width(longest),
                        cache_length)
            ids = np.full((group, width), pad_id, np.int32)
            mask = np.zeros((group, width), np.int32)
            for i, r in enumerate(rows):
                ids[i, :len(prompts[r])], mask[i, :len(prompts[r])] = prompts[r], 1
            ids, mask = right_align(ids, mask)
            if group == batch:  # one prefill straight into the cache
                first, cache = prefill(model, params, jnp.asarray(ids), jnp.asarray(mask), cache)
            else:
                new = init_cache(config, group, width, dtype=model.dtype,
                                 per_layer=not model.scan_layers)
                first, new = prefill(model, params, jnp.asarray(ids), jnp.asarray(mask), new)
                cache = _put_rows(cache, new, jnp.arange(at, at + group, dtype=jnp.int32))
            logits.append(first)
        logits = logits[0] if len(logits) == 1 else jnp.concatenate(logits)
        produced = 0
        while True:
            steps = min(chunk, max_new_tokens - produced)
            tokens, cache = decode_loop(model, params, logits, cache,
                                        jax.random.fold_in(rng, produced), max_new_tokens=steps,
                                        sampler=sampler, eos_ids=tuple(eos_ids), pad_id=pad_id,
                                        callback=None, ordered=True)
            host = np.asarray(tokens)  # [B, steps]
            produced += steps
            for j in np.flatnonzero(~finished):
                row = host[j].tolist()
                hit = next((i for i, t in enumerate(row) if t in eos), None)
                out[j].extend(row if hit is None else row[:hit])
                if hit is not None or stop_when(order[j], out[j]):
                    finished[j] = True
            if finished.all() or produced >= max_new_tokens:
                result = [None] * batch
                for j, r in enumerate(order):
                    result[r] = out[j]
                return result
            logits, cache = decode_step(model, params, tokens[:, -1], cache)
