"""The serving engine's jitted steps over a fixed-shape cache of N slots.

- `prefill_rows`: right-padded prompts into a fresh cache of [P, width], and each row's first token
  (chosen with its own sampling settings).
- `insert_rows`: those P rows copied into given slots of the slot cache (donated: in place), with
  their first tokens into the device-side decode inputs.
- `decode_chunk`: up to `steps` (<= `n`) decode steps of every slot in one on-device loop; a slot
  that is not live, or is done (an eos id or its token budget), is left alone (its cache length
  held at 0, so its writes never run past the cache).
- `score_prompt`: log-probabilities of every prompt token given the ones before (the completions
  API's `echo` + `logprobs`).

Per-slot sampling follows `inference.sampling` (temperature, then top-k, then top-p, ties kept;
temperature 0 greedy = argmax of the logits, as `generate`); slot s's token number c is drawn with
`fold_in(key(seed_s), c)`, so a request's text depends on its seed only, not on its neighbours.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jais2_jax.inference.generate import prefill
from jais2_jax.model.cache import KVCache, put_rows

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotSettings:
    """Per-row settings, every field [rows]."""
    temperature: Array  # float32; 0 = greedy
    top_k: Array  # int32; 0 = off
    top_p: Array  # float32; 1 = off
    key: Array  # uint32 [rows, 2]: jax.random.key_data(jax.random.key(seed))
    stop_ids: Array  # int32 [rows, E]; -1 = unused
    budget: Array  # int32: max new tokens


def filter_row(x: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
    """One row's logits [V] scaled and cut as `sampling.filter_logits` does, with traced settings."""
    vocab = x.shape[-1]
    x = x.astype(jnp.float32) / jnp.maximum(temperature, 1e-30)
    desc = -jnp.sort(-x)  # [V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    in_k = jnp.arange(vocab) < k
    cut = desc[k - 1]
    probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf))
    keep = ((jnp.cumsum(probs) - probs) < top_p) & in_k
    cut_p = desc[jnp.maximum(keep.sum(), 1) - 1]
    cut = jnp.where(top_p < 1.0, jnp.maximum(cut, cut_p), cut)
    return jnp.where(x < cut, -jnp.inf, x)


def choose(logits: Array, settings: SlotSettings, counts: Array, top: int):
    """logits [R, V] float32 -> (tokens [R], their log-probs [R], top log-probs and ids [R, top]);
    top 0: no log-probs (zeros)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled():
        def row(x, t, k, p, key, c):
            key = jax.random.fold_in(jax.random.wrap_key_data(key), c)
            return jax.random.categorical(key, filter_row(x, t, k, p)).astype(jnp.int32)
        drawn = jax.vmap(row)(logits, settings.temperature, settings.top_k, settings.top_p,
                              settings.key, counts)
        return jnp.where(settings.temperature > 0, drawn, greedy)

    tokens = jax.lax.cond(jnp.any(settings.temperature > 0), sampled, lambda: greedy)
    rows = logits.shape[0]
    if not top:  # nobody asked for log-probs: no pass over [rows, vocab] for them
        return (tokens, jnp.zeros((rows,), jnp.float32), jnp.zeros((rows, 0), jnp.float32),
                jnp.zeros((rows, 0), jnp.int32))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logp, top)
    return tokens, chosen, top_lp, top_ids.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "top"), donate_argnames=("cache",))
def prefill_rows(model, params, input_ids: Array, attention_mask: Array, cache: KVCache,
                 settings: SlotSettings, *, top: int):
    """Prompts [P, W] (right-padded) into an empty cache [P, W]; the first token of each row."""
    logits, cache = prefill(model, params, input_ids, attention_mask, cache)
    counts = jnp.zeros((input_ids.shape[0],), jnp.int32)
    return choose(logits, settings, counts, top), cache


@functools.partial(jax.jit, donate_argnames=("cache", "tokens", "counts"))
def insert_rows(cache: KVCache, new: KVCache, slots: Array, tokens: Array, counts: Array,
                first: Array) -> tuple[KVCache, Array, Array]:
    """Rows of `new` [P, W] into slots [P] of `cache` [N, M] (W <= M), and each row's first token
    `first` [P] as its slot's last token (count 1) in `tokens` / `counts` [N]; a slot index N
    drops the row. Nothing goes through the host: the decode inputs stay on the device."""
    tokens = tokens.at[slots].set(first.astype(tokens.dtype), mode="drop")
    counts = counts.at[slots].set(1, mode="drop")
    return put_rows(cache, new, slots), tokens, counts


@functools.partial(jax.jit, static_argnames=("model", "n", "top", "stop_on_free"),
                   donate_argnames=("cache", "tokens", "counts"))
def decode_chunk(model, params, cache: KVCache, tokens: Array, live: Array, counts: Array,
                 settings: SlotSettings, steps: Array, *, n: int, top: int, stop_on_free: bool):
    """Up to `steps` (a traced int32 <= the static `n`: one compile serves every length) decode
    steps of every slot.

    tokens [N]: each slot's last token (not yet in the cache); live [N]; counts [N]: tokens the
    slot has produced. Returns (out tokens [N, n] (-1 where a slot made none), log-probs [N, n],
    top log-probs / ids [N, n, top], tokens, counts, cache); tokens and counts are the next
    chunk's inputs, so they never need to visit the host. Stops early when no slot is active,
    or (stop_on_free) when a slot finishes, so that waiting requests get it at once.
    """
    slots = tokens.shape[0]

    def finished(tok, cnt):
        return jnp.any(tok[:, None] == settings.stop_ids, axis=1) | (cnt >= settings.budget)

    active0 = live & ~finished(tokens, counts)
    out = jnp.full((slots, n), -1, jnp.int32)
    out_lp = jnp.zeros((slots, n), jnp.float32)
    out_top = jnp.zeros((slots, n, top), jnp.float32)
    out_ids = jnp.zeros((slots, n, top), jnp.int32)

    def cond(carry):
        step, active, freed = carry[0], carry[1], carry[2]
        return (step < jnp.minimum(steps, n)) & jnp.any(active) & ~(stop_on_free & freed)

    def body(carry):
        step, active, _, tokens, counts, cache, out, out_lp, out_top, out_ids = carry
        logits, cache = model.apply({"params": params}, tokens[:, None], cache=cache)
        new, lp, top_lp, top_ids = choose(logits[:, 0], settings, counts, top)
        new = jnp.where(active, new, tokens)
        counts = counts + active.astype(jnp.int32)
        # Inactive slots keep length 0: their (ignored) writes stay at the cache's first slot.
        cache = dataclasses.replace(cache, lengths=jnp.where(active, cache.lengths, 0))
        col = jnp.where(active, new, -1)
        out = jax.lax.dynamic_update_slice(out, col[:, None], (0, step))
        out_lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], (0, step))
        if top:
            out_top = jax.lax.dynamic_update_slice(out_top, top_lp[:, None], (0, step, 0))
            out_ids = jax.lax.dynamic_update_slice(out_ids, top_ids[:, None], (0, step, 0))
        still = active & ~finished(new, counts)
        return (step + 1, still, jnp.any(active & ~still), new, counts, cache, out, out_lp,
                out_top, out_ids)

    carry = (jnp.int32(0), active0, jnp.bool_(False), tokens, counts, cache, out, out_lp,
             out_top, out_ids)
    _, _, _, tokens, counts, cache, out, out_lp, out_top, out_ids = jax.lax.while_loop(
        cond, body, carry)
    return out, out_lp, out_top, out_ids, tokens, counts, cache


@functools.partial(jax.jit, static_argnames=("model", "top"))
def score_prompt(model, params, input_ids: Array, attention_mask: Array, *, top: int):
    """log p(token t | tokens < t) for t >= 1 of right-padded prompts [R, T]: ([R, T-1],
    top log-probs and ids [R, T-1, top]), computed as transformers' forward (no cache)."""
    logits = model.apply({"params": params}, input_ids, attention_mask)  # [R, T, V]
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(logp, top)
    return chosen, top_lp, top_ids.astype(jnp.int32)
