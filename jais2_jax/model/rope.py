"""Rotary position embeddings for every rope_type transformers accepts for Jais2, in float32.

`default`, `linear`, `yarn` and `llama3` have fixed frequencies. `dynamic` (NTK) and `longrope` pick
their frequencies from the longest position in the call, as transformers' `dynamic_rope_update`
does; here that choice is traced (`jnp.where`) so it works under jit.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jais2_jax.model.config import Jais2Config


def _base_inv_freq(base: float, dim: int) -> np.ndarray:
    # [dim // 2] float32, the same float32 arithmetic as transformers.
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(base) ** exponents)).astype(np.float32)


def _yarn(config: Jais2Config, base: float, dim: int) -> tuple[np.ndarray, float]:
    rope = config.rope_parameters
    factor = rope["factor"]
    orig = config.rope_original_max_position_embeddings
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp, as transformers does
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = (1 - ramp).astype(np.float32)
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    inv_extrapolation = np.float32(1.0) / pos_freqs
    inv_interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = (inv_interpolation * (1 - extrapolation_weight)
                + inv_extrapolation * extrapolation_weight)
    return inv_freq.astype(np.float32), float(attention_factor)


def _llama3(config: Jais2Config, inv_freq: np.ndarray) -> np.ndarray:
    rope = config.rope_parameters
    factor, low_ff, high_ff = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = config.rope_original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def static_inv_freq(config: Jais2Config) -> tuple[np.ndarray, float]:
    """(inv_freq [head_dim // 2] float32, attention scaling) at initialisation, as transformers."""
    rope = config.rope_parameters
    rope_type, base, dim = rope["rope_type"], rope["rope_theta"], config.head_dim
    inv_freq = _base_inv_freq(base, dim)
    if rope_type in ("default", "dynamic"):
        return inv_freq, 1.0  # dynamic equals default up to max_position_embeddings
    if rope_type == "linear":
        return (inv_freq / np.float32(rope["factor"])).astype(np.float32), 1.0
    if rope_type == "yarn":
        return _yarn(config, base, dim)
    if rope_type == "llama3":
        return _llama3(config, inv_freq), 1.0
    if rope_type == "longrope":
        return _longrope(config, rope["short_factor"])
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def _longrope(config: Jais2Config, ext_factors) -> tuple[np.ndarray, float]:
    rope = config.rope_parameters
    orig = config.rope_original_max_position_embeddings
    factor = rope.get("factor") or config.max_position_embeddings / orig
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    dim = config.head_dim
    shape = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = np.float32(1.0) / (np.asarray(ext_factors, np.float32)
                             * np.float32(rope["rope_theta"]) ** shape)
    return inv.astype(np.float32), float(attention_factor)


def inv_freq_for_positions(config: Jais2Config, positions: jax.Array,
                           seq_len: jax.Array | None = None) -> tuple[jax.Array, float]:
    """The inverse frequencies [head_dim // 2] for a call whose positions are `positions`.

    `seq_len` (default max(positions) + 1) is what dynamic/longrope compare with their lengths;
    callers whose positions include padding pass the real length."""
    inv_freq, scaling = static_inv_freq(config)
    rope = config.rope_parameters
    rope_type = rope["rope_type"]
    if rope_type not in ("dynamic", "longrope"):
        return jnp.asarray(inv_freq), scaling
    if seq_len is None:
        seq_len = jnp.max(positions) + 1
    if rope_type == "longrope":
        long_inv, _ = _longrope(config, rope["long_factor"])
        long_ = seq_len > config.rope_original_max_position_embeddings
        return jnp.where(long_, jnp.asarray(long_inv), jnp.asarray(inv_freq)), scaling
    # dynamic NTK: grow the base once the call reaches past max_position_embeddings.
    dim, factor, max_pos = config.head_dim, rope["factor"], config.max_position_embeddings
    seq = jnp.maximum(seq_len, max_pos).astype(jnp.float32)
    base = rope["rope_theta"] * ((factor * seq / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return (1.0 / (base ** exponents)).astype(jnp.float32), scaling


def rope_cos_sin(config: Jais2Config, positions: jax.Array,
                 seq_len: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """cos, sin: [batch, length, head_dim] float32 for integer positions [batch, length]."""
    inv_freq, scaling = inv_freq_for_positions(config, positions, seq_len)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, head_dim // 2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on x [batch, length, heads, head_dim]; computed in float32."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x * cos + rotated * sin).astype(dtype)
