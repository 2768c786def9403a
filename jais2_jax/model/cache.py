"""The KV cache: a pytree you pass in and get back, stacked over layers like the parameters.

Each row's tokens sit right-aligned at slots [0, lengths[b]); a new chunk of T tokens for row b is
written at slots [lengths[b], lengths[b] + T) and its RoPE positions are lengths[b] + t. A batch of
prompts of different lengths is therefore one prefill call (prompts right-padded, the attention
mask says how many tokens of each row are real), and decoding advances every row independently.

`init_cache(..., dtype=jnp.int8)` holds int8 keys and values with one float32 scale per head per
token (`k_scale`, `v_scale`: `scale = max |k| over head_dim / 127`, round half to even): half the
bytes of a bf16 cache, for long contexts and large batches.

`init_cache(..., per_layer=True)` holds k and v as tuples of per-layer [batch, ...] arrays instead,
for `scan_layers=False` decoding: each layer's buffer is then updated in place, where rebuilding a
stacked buffer from per-layer slices would copy the whole cache every step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jais2_jax.model.config import Jais2Config

# Logical axis names of the cache arrays; the sharding rules map them onto the mesh
# (`parallel.cache_shardings`: kv_heads over tensor, batch over data*fsdp).
CACHE_KV_AXES = ("layers", "batch", "cache_length", "kv_heads", "head_dim")
CACHE_LENGTHS_AXES = ("batch",)
CACHE_SCALE_AXES = ("layers", "batch", "cache_length", "kv_heads")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # [layers, batch, max_length, kv_heads, head_dim] (or per_layer: a tuple)
    v: jax.Array  # [layers, batch, max_length, kv_heads, head_dim] (or per_layer: a tuple)
    lengths: jax.Array  # [batch] int32: filled slots per row
    # int8 caches: float32 scales [layers, batch, max_length, kv_heads] (or per_layer: tuples)
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def layer_arrays(self) -> tuple:
        """What each layer reads and writes: (k, v) or, int8, (k, v, k_scale, v_scale)."""
        return (self.k, self.v) + ((self.k_scale, self.v_scale) if self.quantized else ())

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, (tuple, list))

    @property
    def max_length(self) -> int:
        return self.k[0].shape[1] if self.per_layer else self.k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0] if self.per_layer else self.k.shape[1]


def init_cache(config: Jais2Config, batch_size: int, max_length: int,
               dtype=jnp.bfloat16, *, per_layer: bool = False) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_length` tokens each (`dtype` int8: a
    quantized cache with per-head-per-token scales)."""
    if batch_size <= 0 or max_length <= 0:
        raise ValueError(f"batch_size and max_length must be positive, got {batch_size}, {max_length}")
    if max_length > config.max_position_embeddings:
        raise ValueError(f"cache max_length {max_length} exceeds max_position_embeddings "
                         f"{config.max_position_embeddings}")
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.integer) and dtype != jnp.int8:
        raise ValueError(f"cache dtype {dtype}: a quantized cache is int8")
    quantized = dtype == jnp.int8
    shape = (batch_size, max_length, config.num_key_value_heads, config.head_dim)
    lengths = jnp.zeros((batch_size,), jnp.int32)
    n = config.num_hidden_layers
    if per_layer:
        def make(s, dt):
            return tuple(jnp.zeros(s, dt) for _ in range(n))
    else:
        def make(s, dt):
            return jnp.zeros((n,) + s, dt)
    scales = dict(k_scale=make(shape[:3], jnp.float32),
                  v_scale=make(shape[:3], jnp.float32)) if quantized else {}
    return KVCache(k=make(shape, dtype), v=make(shape, dtype), lengths=lengths, **scales)


def as_cache_dtype(dtype) -> jnp.dtype:
    """A cache dtype from a name: a float dtype name, or "int8" (quantized)."""
    if isinstance(dtype, str):
        if dtype == "int8":
            return jnp.dtype(jnp.int8)
        names = ("float32", "bfloat16", "float16")
        if dtype not in names:
            raise ValueError(f"cache dtype {dtype!r}: choose one of {names + ('int8',)}")
    return jnp.dtype(dtype)


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[..., head_dim] -> (int8 values, float32 scale [...]): one scale per head per token."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


def dequantize_kv(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


def cache_layout(config: Jais2Config, batch_size: int, max_length: int, *,
                 per_layer: bool = False, quantized: bool = False) -> tuple[KVCache, KVCache]:
    """(logical axes, shapes) of every array of `init_cache(config, batch_size, max_length,
    per_layer=...)`, as two KVCache trees: what the sharding rules need to place a cache."""
    layer_shape = (batch_size, max_length, config.num_key_value_heads, config.head_dim)
    if per_layer:
        n = config.num_hidden_layers
        axes = KVCache(k=(CACHE_KV_AXES[1:],) * n, v=(CACHE_KV_AXES[1:],) * n,
                       lengths=CACHE_LENGTHS_AXES)
        shapes = KVCache(k=(layer_shape,) * n, v=(layer_shape,) * n, lengths=(batch_size,))
        if quantized:
            axes.k_scale = axes.v_scale = (CACHE_SCALE_AXES[1:],) * n
            shapes.k_scale = shapes.v_scale = (layer_shape[:3],) * n
    else:
        full = (config.num_hidden_layers,) + layer_shape
        axes = KVCache(k=CACHE_KV_AXES, v=CACHE_KV_AXES, lengths=CACHE_LENGTHS_AXES)
        shapes = KVCache(k=full, v=full, lengths=(batch_size,))
        if quantized:
            axes.k_scale = axes.v_scale = CACHE_SCALE_AXES
            shapes.k_scale = shapes.v_scale = full[:4]
    return axes, shapes


def _put(buf: jax.Array, rows: jax.Array, slots: jax.Array, batch_axis: int) -> jax.Array:
    width = rows.shape[batch_axis + 1]
    index = (slice(None),) * batch_axis + (slots, slice(0, width))
    return buf.at[index].set(rows.astype(buf.dtype), mode="drop")


def put_rows(cache: KVCache, new: KVCache, slots: jax.Array) -> KVCache:
    """The rows of `new` [P, W] written into rows `slots` [P] of `cache` [N, M] (W <= M, the same
    layout), lengths included; a slot index N drops its row. In place under jit with `cache`
    donated."""
    axis = 0 if cache.per_layer else 1

    def put(buf, rows):
        if cache.per_layer:
            return tuple(_put(b, r, slots, axis) for b, r in zip(buf, rows))
        return _put(buf, rows, slots, axis)

    fields = {"k": put(cache.k, new.k), "v": put(cache.v, new.v),
              "lengths": cache.lengths.at[slots].set(new.lengths, mode="drop")}
    if cache.quantized:
        fields.update(k_scale=put(cache.k_scale, new.k_scale),
                      v_scale=put(cache.v_scale, new.v_scale))
    return dataclasses.replace(cache, **fields)
