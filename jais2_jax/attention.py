"""One attention function for every caller, dispatching by backend.

Masks are described, not materialised, so each backend builds only what it needs:
- `causal`: query i attends key j when key_pos[j] <= query_pos[i];
- `kv_lengths` [batch]: keys at slots >= kv_lengths[b] are invalid (cache fill level, right padding);
- `kv_mask` [batch, kv_len] bool: arbitrary invalid keys (left padding without a cache);
- `segment_ids` [batch, length]: packed documents attend only within their own segment.

On GPU the cuDNN flash kernel is used when the mask is expressible as causal + lengths; everything
else goes through XLA's `jax.nn.dot_product_attention` with a boolean mask. A TPU Pallas (splash)
kernel slots in at `_IMPLEMENTATIONS`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _dense_mask(q_len, kv_len, *, causal, q_offset, kv_lengths, kv_mask, segment_ids, batch):
    """Boolean mask [batch, 1, q_len, kv_len] (True = attend), or None when nothing is masked."""
    mask = None

    def both(a, b):
        return b if a is None else a & b

    if causal:
        offset = jnp.zeros((batch,), jnp.int32) if q_offset is None else q_offset
        q_pos = offset[:, None] + jnp.arange(q_len)[None, :]  # [B, T] slot of each query
        k_pos = jnp.arange(kv_len)
        mask = both(mask, k_pos[None, None, :] <= q_pos[:, :, None])
    if kv_lengths is not None:
        mask = both(mask, (jnp.arange(kv_len)[None, :] < kv_lengths[:, None])[:, None, :])
    if kv_mask is not None:
        mask = both(mask, kv_mask.astype(bool)[:, None, :])
    if segment_ids is not None:
        mask = both(mask, segment_ids[:, :, None] == segment_ids[:, None, :])
    return None if mask is None else mask[:, None, :, :]


def dot_product_attention(
    q: Array,  # [batch, q_len, heads, head_dim]
    k: Array,  # [batch, kv_len, kv_heads, head_dim]
    v: Array,  # [batch, kv_len, kv_heads, head_dim]
    *,
    causal: bool = True,
    q_offset: Array | None = None,  # [batch] int32: slot of the first query (cached decoding)
    kv_lengths: Array | None = None,  # [batch] int32
    kv_mask: Array | None = None,  # [batch, kv_len] bool
    segment_ids: Array | None = None,  # [batch, length] int32, q_len == kv_len
    implementation: str | None = None,  # None = pick by backend; "xla" | "cudnn"
) -> Array:  # [batch, q_len, heads, head_dim]
    batch, q_len = q.shape[:2]
    kv_len = k.shape[1]
    scale = q.shape[-1] ** -0.5
    impl = implementation or _default_implementation(q)
    if impl == "cudnn" and _cudnn_supports(q, causal, q_offset, kv_mask, segment_ids, q_len, kv_len):
        lengths = kv_lengths
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=causal and q_len > 1,
            key_value_seq_lengths=None if lengths is None else lengths.astype(jnp.int32),
            implementation="cudnn")
    mask = _dense_mask(q_len, kv_len, causal=causal, q_offset=q_offset, kv_lengths=kv_lengths,
                       kv_mask=kv_mask, segment_ids=segment_ids, batch=batch)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


def _default_implementation(q: Array) -> str:
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def _cudnn_supports(q, causal, q_offset, kv_mask, segment_ids, q_len, kv_len) -> bool:
    """cuDNN's fused kernel covers causal from slot 0 (+ key lengths) and single-query decoding."""
    if kv_mask is not None or segment_ids is not None or q.shape[-1] % 8 or q.shape[-1] > 256:
        return False
    if q_len == 1:
        return True  # one query per row: only the key lengths matter
    return q_offset is None and (not causal or q_len == kv_len)
