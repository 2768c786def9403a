"""One attention function for every caller, dispatching by backend.

Masks are described, not materialised, so each backend builds only what it needs:
- `causal`: query i attends key j when key_pos[j] <= query_pos[i];
- `kv_lengths` [batch]: keys at slots >= kv_lengths[b] are invalid (cache fill level, right padding);
- `kv_mask` [batch, kv_len] bool: arbitrary invalid keys (left padding without a cache), or
  [batch, q_len, kv_len] bool: which keys each query may see, on top of causality (answers packed
  after their shared question, each seeing the question and itself; `evaluation/scoring.py`);
- `segment_ids` [batch, length]: packed documents attend only within their own segment.

The output is tagged "attention" for the remat policies (jax.ad_checkpoint.checkpoint_name), except
cuDNN's, which the policies save by primitive (see model.REMAT_POLICIES).

On GPU the cuDNN flash kernel is used when the mask is expressible as causal + lengths, or as causal
+ a [batch, q_len, kv_len] mask (given to cuDNN as a bias). On TPU the Pallas splash kernel runs
training and prefill (causal + segment ids; key padding becomes a segment), inside `shard_map` over
the context mesh since Mosaic kernels cannot be partitioned automatically;
`implementation="splash_interpret"` runs the same kernel on CPU. Everything else goes through XLA's
`jax.nn.dot_product_attention` with a boolean mask.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

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
        kv_mask = kv_mask.astype(bool)
        mask = both(mask, kv_mask[:, None, :] if kv_mask.ndim == 2 else kv_mask)
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
    kv_mask: Array | None = None,  # [batch, kv_len] or [batch, q_len, kv_len] bool
    segment_ids: Array | None = None,  # [batch, length] int32, q_len == kv_len
    implementation: str | None = None,  # None: by backend; "xla" | "cudnn" | "splash" | "splash_interpret"
) -> Array:  # [batch, q_len, heads, head_dim]
    batch, q_len = q.shape[:2]
    kv_len = k.shape[1]
    scale = q.shape[-1] ** -0.5
    impl = implementation or _default_implementation(q)
    if impl.startswith("splash") and causal and q_offset is None and q_len == kv_len \
            and (kv_mask is None or kv_mask.ndim == 2) \
            and (segment_ids is None or (kv_mask is None and kv_lengths is None)):
        # Key padding becomes its own segment (0); causality keeps every query row non-empty.
        if kv_mask is not None:
            segment_ids = kv_mask.astype(jnp.int32)
        if kv_lengths is not None:  # right padding, e.g. the prefill of a cache
            valid = jnp.arange(kv_len)[None, :] < kv_lengths[:, None]
            segment_ids = valid.astype(jnp.int32) if segment_ids is None else segment_ids * valid
        return checkpoint_name(
            splash_attention(q, k, v, segment_ids, interpret=impl == "splash_interpret"), "attention")
    if impl == "cudnn" and _cudnn_supports(q, causal, q_offset, kv_mask, segment_ids, q_len, kv_len):
        # Untagged: remat policies save the cuDNN forward's outputs (with the softmax statistics)
        # by primitive, see model.REMAT_POLICIES["dots"].
        lengths = kv_lengths
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=causal and q_len > 1,
            key_value_seq_lengths=None if lengths is None else lengths.astype(jnp.int32),
            implementation="cudnn")
    if impl == "cudnn" and _cudnn_supports_query_key_mask(q, causal, q_offset, kv_lengths, kv_mask,
                                                          segment_ids, q_len, kv_len):
        # A [batch, q, kv] mask rides along as an additive bias (one per row, shared by heads):
        # still the fused kernel, the causal part skipped block by block.
        return jax.nn.dot_product_attention(q, k, v, mask=kv_mask.astype(bool)[:, None],
                                            scale=scale, is_causal=True, implementation="cudnn")
    mask = _dense_mask(q_len, kv_len, causal=causal, q_offset=q_offset, kv_lengths=kv_lengths,
                       kv_mask=kv_mask, segment_ids=segment_ids, batch=batch)
    return checkpoint_name(
        jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla"),
        "attention")


def _default_implementation(q: Array) -> str:
    backend = jax.default_backend()
    if backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if backend == "tpu" and q.shape[1] % 128 == 0:
        return "splash"
    return "xla"


def _splash_block_sizes(length: int):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    b = min(512, length)
    return splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                             block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


def _splash_local(q, k, v, segment_ids, *, interpret):
    """Splash on one device's shard: q [b, T, h, hd], k/v [b, T, kv, hd] (GQA native)."""
    # Imported here: Pallas/Mosaic stay out of `import jais2_jax` on CPU and GPU.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as splash_mask,
    )
    length, heads = q.shape[1], q.shape[2]
    if length % 128 and not interpret:
        raise ValueError(f"splash attention needs a sequence length divisible by 128, got {length}")
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * heads)
    kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1,
                                    block_sizes=_splash_block_sizes(length), interpret=interpret)
    to_hmajor = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [b, T, h, d] -> [b, h, T, d]
    q = to_hmajor(q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype))  # the kernel does not scale
    if segment_ids is None:
        out = jax.vmap(kernel)(q, to_hmajor(k), to_hmajor(v))
    else:
        out = jax.vmap(lambda q_, k_, v_, s: kernel(q_, k_, v_, segment_ids=splash.SegmentIds(s, s)))(
            q, to_hmajor(k), to_hmajor(v), segment_ids)
    return to_hmajor(out)


def splash_attention(q, k, v, segment_ids=None, *, interpret=False):
    """Causal splash attention; under a mesh (`jax.set_mesh`), one kernel per shard via shard_map
    with batch and heads split as the logical-axis rules say."""
    mesh = jax.sharding.get_abstract_mesh()
    local = functools.partial(_splash_local, interpret=interpret)
    if mesh.empty:
        return local(q, k, v, segment_ids)
    rules = nn.get_logical_axis_rules()
    qspec = nn.logical_to_mesh_axes(("batch", "length", "heads", "head_dim"), rules)
    kvspec = nn.logical_to_mesh_axes(("batch", "length", "kv_heads", "head_dim"), rules)
    segspec = P(qspec[0], None)
    if segment_ids is None:
        return jax.shard_map(lambda a, b, c: local(a, b, c, None), mesh=mesh,
                             in_specs=(qspec, kvspec, kvspec), out_specs=qspec,
                             check_vma=False)(q, k, v)
    return jax.shard_map(local, mesh=mesh, in_specs=(qspec, kvspec, kvspec, segspec),
                         out_specs=qspec, check_vma=False)(q, k, v, segment_ids)


def _cudnn_supports(q, causal, q_offset, kv_mask, segment_ids, q_len, kv_len) -> bool:
    """cuDNN's fused kernel covers causal from slot 0 (+ key lengths) and single-query decoding."""
    if kv_mask is not None or segment_ids is not None or q.shape[-1] % 8 or q.shape[-1] > 256:
        return False
    if q_len == 1:
        return True  # one query per row: only the key lengths matter
    return q_offset is None and (not causal or q_len == kv_len)


def _cudnn_supports_query_key_mask(q, causal, q_offset, kv_lengths, kv_mask, segment_ids, q_len,
                                   kv_len) -> bool:
    """cuDNN with a per-row [batch, q, kv] mask: causal from slot 0, nothing else masked."""
    return (kv_mask is not None and kv_mask.ndim == 3 and causal and q_offset is None
            and kv_lengths is None and segment_ids is None and q_len == kv_len and q_len > 1
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)
