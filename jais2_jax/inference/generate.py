"""Batched generation: one jitted prefill for the whole batch, then an on-device decode loop.

`generate` takes transformers-style prompts (left-padded `input_ids` + `attention_mask`), moves
each row's real tokens to the front (the cache's layout: row b's tokens at slots [0, len_b)),
prefills every row in one call, and decodes in a `lax.while_loop` that stops when every row has
produced an EOS or `max_new_tokens` tokens. RoPE positions are per row (0 at each row's first real
token), as in transformers' `generate`.

`prefill` and `decode_step` are the two jitted steps, with the cache donated so it is updated in
place; use them directly for custom loops (or `build_inference_program`, which places them on a
mesh). For GPU decoding use `ModelOptions(scan_layers=False)` with
`unstack_layers(params)`: `generate` then keeps a per-layer cache as well.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jais2_jax.inference.sampling import Sampler, sample
from jais2_jax.model.cache import KVCache, init_cache
from jais2_jax.model.modules import Jais2ForCausalLM

Array = jax.Array

# Shapes are rounded up so that prompts of nearby lengths share one compiled program.
PROMPT_BUCKET = 64
CACHE_BUCKET = 128


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def prefill(model: Jais2ForCausalLM, params, input_ids: Array, attention_mask: Array,
            cache: KVCache) -> tuple[Array, KVCache]:
    """Right-padded prompts into an empty cache.

    input_ids, attention_mask: [batch, length], each row's real tokens first.
    Returns the float32 logits of each row's last real token [batch, vocab] and the cache.
    """
    hidden, cache = model.apply({"params": params}, input_ids, attention_mask, cache=cache,
                                prefill=True, method="hidden_states")  # [B, T, D]
    last = attention_mask.astype(jnp.int32).sum(axis=1) - 1  # [B]
    hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [B, 1, D]
    # Only the last position's logits: [B, T, 150k] float32 would dwarf the rest of prefill.
    logits = model.apply({"params": params}, hidden, method="logits")  # [B, 1, V]
    return logits[:, 0], cache


def _decode(model, params, tokens, cache):
    logits, cache = model.apply({"params": params}, tokens[:, None], cache=cache)  # [B, 1, V]
    return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def decode_step(model: Jais2ForCausalLM, params, tokens: Array,
                cache: KVCache) -> tuple[Array, KVCache]:
    """One token per row: tokens [batch] -> (logits [batch, vocab] float32, cache)."""
    return _decode(model, params, tokens, cache)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampler", "eos_ids",
                                             "pad_id", "callback", "ordered"),
                   donate_argnames=("cache",))
def decode_loop(model, params, logits, cache, rng, *, max_new_tokens: int, sampler: Sampler,
                 eos_ids: tuple[int, ...], pad_id: int, callback, ordered: bool = True):
    """Samples from the prefill logits, then decodes until every row is done.

    Returns the tokens [B, N] int32 and the cache (returned so that the donated buffer is the
    loop's carry, updated in place, rather than a copy)."""
    batch = logits.shape[0]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def pick(step, logits, done):
        key = None if sampler.greedy else jax.random.fold_in(rng, step)
        tokens = jnp.where(done, pad_id, sample(logits, key, sampler))  # [B]
        if callback is not None:
            jax.debug.callback(callback, step, tokens, ordered=ordered)
        return tokens, done | jnp.isin(tokens, eos)

    tokens, done = pick(0, logits, jnp.zeros((batch,), bool))
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tokens)

    def cond(carry):
        step, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, tokens, done, out, cache = carry
        logits, cache = _decode(model, params, tokens, cache)
        tokens, done = pick(step, logits, done)
        out = jax.lax.dynamic_update_slice(out, tokens[:, None], (0, step))
        return step + 1, tokens, done, out, cache

    _, _, _, out, cache = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, done, out, cache))
    return out, cache


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _eos_ids(config, eos_token_id) -> tuple[int, ...]:
    eos = config.eos_token_ids if eos_token_id is None else eos_token_id
    ids = (eos,) if isinstance(eos, (int, np.integer)) else tuple(eos)
    for t in ids:
        if not 0 <= int(t) < config.vocab_size:
            raise ValueError(f"eos_token_id {t} is outside the vocabulary [0, {config.vocab_size})")
    return tuple(int(t) for t in ids)


def _on_one_device(params) -> bool:
    """JAX orders host callbacks only in single-device programs; on a mesh the decode steps still
    run one after another, and each call's `step` says which one it is."""
    devices = set()
    for x in jax.tree_util.tree_leaves(params):
        if isinstance(x, jax.Array):
            devices |= x.sharding.device_set
    return len(devices) <= 1


def right_align(input_ids, attention_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Moves each row's real tokens to the front, keeping their order (left padding -> right).

    Returns (input_ids, attention_mask) as int32 numpy arrays of the same shape.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 and 1")
    order = np.argsort(1 - mask, axis=1, kind="stable")  # real tokens first, in order
    return (np.take_along_axis(ids, order, axis=1).astype(np.int32),
            np.take_along_axis(mask, order, axis=1).astype(np.int32))


def generate(model: Jais2ForCausalLM, params, input_ids, attention_mask=None, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
             rng: Array | None = None, callback: Callable[[int, np.ndarray], None] | None = None,
             cache_length: int | None = None, cache_dtype=None) -> Array:
    """New tokens [batch, max_new_tokens] int32 for a batch of prompts.

    input_ids, attention_mask: [batch, length], padded on either side (transformers pads left).
    temperature 0 is greedy; otherwise sampling (with optional top_k / top_p) needs `rng`, a
    `jax.random` key: the same key gives the same tokens. A row stops at its first EOS (the
    config's eos ids, or `eos_token_id` which replaces them); later positions hold the pad id (the
    EOS id when the config has no pad). `callback(step, tokens [batch])` is called on the host as
    each step's tokens are chosen (streaming), and all calls have happened when `generate`
    returns; the loop is compiled once per distinct callback object, so reuse one.
    `cache_length` (default: prompt + max_new_tokens, rounded up) bounds prompt + new tokens;
    `cache_dtype` (default: the model's compute dtype; `jnp.int8`: a quantized cache).
    """
    config = model.config
    sampler = Sampler(temperature, top_k, top_p)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not sampler.greedy and rng is None:
        raise ValueError("sampling (temperature > 0) needs an explicit key: rng=jax.random.key(seed)")
    ids, mask = right_align(input_ids, attention_mask)
    batch, length = ids.shape
    lengths = mask.sum(axis=1)  # [B]
    if length == 0 or (lengths == 0).any():
        rows = np.flatnonzero(lengths == 0).tolist() if length else "all"
        raise ValueError(f"empty prompt (rows {rows}): each row needs at least one token")
    real = ids[mask == 1]
    if real.min() < 0 or real.max() >= config.vocab_size:
        bad = int(real[(real < 0) | (real >= config.vocab_size)][0])
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {config.vocab_size})")

    longest = int(lengths.max())
    total = longest + int(max_new_tokens)
    limit = config.max_position_embeddings
    if total > limit:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"exceeds max_position_embeddings ({limit})")
    needed = total - 1  # the last new token is never written to the cache
    if cache_length is None:
        cache_length = min(_round_up(needed, CACHE_BUCKET), limit)
    elif needed > cache_length:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) needs "
                         f"{needed} cache slots, but cache_length is {cache_length}")
    eos_ids = _eos_ids(config, eos_token_id)
    pad_id = config.pad_token_id if config.pad_token_id is not None else (
        eos_ids[0] if eos_ids else 0)
    # Masked-out positions still go through the embedding: whatever the caller padded with (an id
    # outside the vocabulary embeds as NaN, which attention's zero weights do not cancel) becomes
    # the pad id.
    ids = np.where(mask == 1, ids, pad_id).astype(np.int32)

    # Prompt columns: the longest row, rounded up (never past the cache) to reuse compilations.
    width = min(_round_up(longest, PROMPT_BUCKET), cache_length)
    ids = np.pad(ids[:, :longest], ((0, 0), (0, width - longest)), constant_values=pad_id)
    mask = np.pad(mask[:, :longest], ((0, 0), (0, width - longest)))
    cache = init_cache(config, batch, cache_length,
                       dtype=model.dtype if cache_dtype is None else cache_dtype,
                       per_layer=not model.scan_layers)
    logits, cache = prefill(model, params, jnp.asarray(ids), jnp.asarray(mask), cache)
    tokens, _ = decode_loop(model, params, logits, cache, rng, max_new_tokens=int(max_new_tokens),
                             sampler=sampler, eos_ids=eos_ids, pad_id=int(pad_id),
                             callback=callback, ordered=_on_one_device(params))
    if callback is not None:
        jax.effects_barrier()  # every step's callback has run when generate returns
    return tokens
