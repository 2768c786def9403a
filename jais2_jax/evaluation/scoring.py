"""Log-likelihoods of continuations, and generation with stop strings: the device side of the
lm-evaluation-harness model (`evaluation/lm.py`).

Two ways to score a request (context, continuation):
- `score` runs the decoder once over a batch of right-padded rows (context + continuation, the
  last token dropped, as lm-eval's `hf` model feeds them) and, for each request, gathers the hidden
  states at its continuation's positions. Requests with the same input (multiple choice with
  one-token answers: the same input, different last targets) share one row.
- Requests that share a context (the answers of a multiple-choice question) score it once:
  `prefill_contexts` runs each distinct context into a KV cache and scores every request's first
  continuation token from its last position; `score_suffixes` then runs only the rest of each
  continuation against its context's cache rows. The attention is causal either way, so this is
  the same function of the same tokens as the one-row forward: an answer still sees only its
  context and its own earlier tokens, never another answer's.
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
from jais2_jax.model.cache import KVCache, init_cache
from jais2_jax.parallel.sharding import use_mesh

Array = jax.Array
# The most float32 logits one chunk of `score` may hold, in bytes (rows x positions x vocab x 4).
LOGITS_BYTES = 1 << 30


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def bucket_length(n: int, shortest: int = 64) -> int:
    """Padded input length: `shortest`, then two sizes per octave (a handful of compiled shapes,
    at most a third of a row padding)."""
    if n <= shortest:
        return shortest
    step = max(shortest, _pow2(n) // 4)
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
def score(model, params, input_ids: Array, attention_mask: Array, rows: Array, starts: Array,
          targets: Array, target_mask: Array, *, chunk: int) -> tuple[Array, Array]:
    """input_ids, attention_mask: [B, T] right-padded; per request r (R of them): rows [R] (its
    row of the batch), starts [R] (the position whose logits predict its first target), targets
    [R, C] and target_mask [R, C] (1 for real targets, a prefix of each row).

    Returns (sum of float32 log-probs of the targets [R], all targets greedy [R])."""
    del attention_mask  # right padding: causal attention keeps it out of every real position
    # No key mask: then the GPU's fused (cuDNN) causal kernel runs, not a dense masked softmax.
    hidden, _ = model.apply({"params": params}, input_ids, method="hidden_states")  # [B, T, D]
    length = input_ids.shape[1]
    width = targets.shape[1]
    pos = jnp.clip(starts[:, None] + jnp.arange(width)[None, :], 0, length - 1)  # [R, C]
    return _target_logprobs(model, params, hidden[rows[:, None], pos], targets, target_mask,
                            chunk)


@functools.partial(jax.jit, static_argnames=("model", "cache_length"))
def prefill_contexts(model, params, input_ids: Array, attention_mask: Array, rows: Array,
                     targets: Array, *, cache_length: int) -> tuple[Array, Array, KVCache]:
    """Contexts input_ids / attention_mask [B, T] (right-padded) into a new cache of
    `cache_length` slots; per request r: rows [R] (its context's row) and targets [R] (its first
    continuation token, predicted from the context's last position).

    Returns (float32 log-prob of each first target [R], greedy [R], the cache)."""
    cache = init_cache(model.config, input_ids.shape[0], cache_length, dtype=model.dtype,
                       per_layer=not model.scan_layers)
    hidden, cache = model.apply({"params": params}, input_ids, attention_mask, cache=cache,
                                prefill=True, method="hidden_states")  # [B, T, D]
    last = attention_mask.astype(jnp.int32).sum(axis=1) - 1  # [B]
    picked = hidden[rows, last[rows]][:, None]  # [R, 1, D]
    ones = jnp.ones(targets.shape + (1,), jnp.int32)
    logp, greedy = _target_logprobs(model, params, picked, targets[:, None], ones, 1)
    return logp, greedy, cache


def take_rows(cache: KVCache, rows: Array) -> KVCache:
    """The cache rows `rows` (a row may be taken several times)."""
    axis = 0 if cache.per_layer else 1  # [B, S, ...] per layer, or [layers, B, S, ...]
    take = lambda a: jnp.take(a, rows, axis=axis)
    scales = {"k_scale": jax.tree.map(take, cache.k_scale),
              "v_scale": jax.tree.map(take, cache.v_scale)} if cache.quantized else {}
    return KVCache(k=jax.tree.map(take, cache.k), v=jax.tree.map(take, cache.v),
                   lengths=cache.lengths[rows], **scales)


@functools.partial(jax.jit, static_argnames=("model", "chunk"))
def score_suffixes(model, params, cache: KVCache, rows: Array, input_ids: Array,
                   attention_mask: Array, targets: Array, target_mask: Array, *,
                   chunk: int) -> tuple[Array, Array]:
    """The rest of each continuation after its context (in `cache`, from `prefill_contexts`):
    per row n (N of them): rows [N] (its context's cache row), input_ids / attention_mask [N, W]
    (the continuation without its last token, right-padded: continuation[:-1]) and targets /
    target_mask [N, W] (what each of those positions predicts: continuation[1:]). The context's
    cache is read, never changed.

    Returns (sum of float32 log-probs of the targets [N], all targets greedy [N])."""
    sub = take_rows(cache, rows)
    hidden, _ = model.apply({"params": params}, input_ids, attention_mask, cache=sub,
                            method="hidden_states")  # [N, W, D]
    return _target_logprobs(model, params, hidden, targets, target_mask, chunk)


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
    width = min(bucket_length(longest), cache_length)
    ids = np.full((batch, width), pad_id, np.int32)
    mask = np.zeros((batch, width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = p, 1
    ids, mask = right_align(ids, mask)
    if rng is None:
        rng = jax.random.key(0)
    out: list[list[int]] = [[] for _ in range(batch)]
    finished = np.zeros(batch, bool)
    eos = set(eos_ids)
    with mesh_context(mesh):
        cache = init_cache(config, batch, cache_length, dtype=model.dtype,
                           per_layer=not model.scan_layers)
        logits, cache = prefill(model, params, jnp.asarray(ids), jnp.asarray(mask), cache)
        produced = 0
        while True:
            steps = min(chunk, max_new_tokens - produced)
            tokens, cache = decode_loop(model, params, logits, cache,
                                        jax.random.fold_in(rng, produced), max_new_tokens=steps,
                                        sampler=sampler, eos_ids=tuple(eos_ids), pad_id=pad_id,
                                        callback=None, ordered=True)
            host = np.asarray(tokens)  # [B, steps]
            produced += steps
            for b in np.flatnonzero(~finished):
                row = host[b].tolist()
                hit = next((i for i, t in enumerate(row) if t in eos), None)
                out[b].extend(row if hit is None else row[:hit])
                if hit is not None or stop_when(b, out[b]):
                    finished[b] = True
            if finished.all() or produced >= max_new_tokens:
                return out
            logits, cache = decode_step(model, params, tokens[:, -1], cache)
