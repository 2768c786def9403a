"""Jais2 decoder in Flax linen, numerically the function of transformers' Jais2ForCausalLM.

Layer: LayerNorm -> attention (q/k/v/o with biases, GQA, rotate-half RoPE) -> residual ->
LayerNorm -> MLP down(relu(up(x))^2) -> residual. Final LayerNorm, lm_head (or the tied embedding).

Parameters carry logical axis names (`vocab, embed, heads, kv_heads, head_dim, mlp, layers`).
With `ModelOptions(scan_layers=True)` (the default and the one on-disk layout) the layers are one
`nn.scan` over a leading `layers` axis; `scan_layers=False` runs the same layer code over per-layer
arrays (`unstack_layers(params)`), which GPU decoding wants. Every projection is a `Linear`
(`linear.py`, the matmul seam): dense, quantized or with a low-rank adapter, by the parameter tree.

Numerics: parameters in `param_dtype`, activations in `dtype`; matmuls accumulate in float32,
LayerNorm statistics, RoPE, softmax and the logits are float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jais2_jax.kernels.layernorm import layer_norm
from jais2_jax.model.attention import dot_product_attention
from jais2_jax.model.cache import KVCache, dequantize_kv, quantize_kv
from jais2_jax.model.config import Jais2Config
from jais2_jax.model.linear import (
    QUANTIZED_DTYPES,
    TABLE_SCHEME,
    Epilogue,
    Linear,
    LoraSpec,
    dot_f32,
    relu2,
)
from jais2_jax.model.options import REMAT_POLICIES, ModelOptions
from jais2_jax.model.rope import apply_rope, rope_cos_sin

Array = jax.Array

# The projections an adapter may target (PEFT's target_modules names).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu2": relu2,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}

def _constrain(x, axes):
    return nn.with_logical_constraint(x, axes)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every submodule needs from the model: dtypes, options, and the matmul seam's settings
    (the projections' quantization and LoRA adapters, by HF module name)."""
    dtype: Any
    param_dtype: Any
    options: ModelOptions
    quantization: str | None = None
    lora: LoraSpec | None = None
    lora_targets: tuple[str, ...] = LORA_TARGETS

    def linear(self, name: str, features, in_axes, out_axes, *, use_bias: bool, init_std: float,
               **epilogue) -> Linear:
        """The one way the model makes a projection (the matmul seam)."""
        lora = self.lora if name in self.lora_targets else None
        return Linear(tuple(features), tuple(in_axes), tuple(out_axes), use_bias=use_bias,
                      dtype=self.dtype, param_dtype=self.param_dtype, init_std=init_std,
                      epilogue=Epilogue(**epilogue), quantization=self.quantization, lora=lora,
                      name=name)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm (weight `scale` and `bias`), statistics in float32 (`kernels/layernorm.py`:
    XLA, or one Pallas kernel each way on GPU)."""
    eps: float
    dtype: Any
    param_dtype: Any
    impl: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (d,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                          (d,), self.param_dtype)
        return layer_norm(x, scale, bias, eps=self.eps, dtype=self.dtype, impl=self.impl)


class Embed(nn.Module):
    """The token embedding: `embedding` [vocab, embed] in `param_dtype` (nn.Embed's parameter), or
    int8 / fp8 rows + a float32 scale per row (`scale` [vocab], `quantize.quantize_embedding`),
    as the parameter tree holds (`quantization` says which one `init` creates). The lookup
    gathers rows before any cast: a quantized table is never dequantized whole."""
    num_embeddings: int
    features: int
    dtype: Any
    param_dtype: Any
    init_std: float
    quantization: str | None = None

    def setup(self):
        shape = (self.num_embeddings, self.features)
        if self.quantization is not None or self.has_variable("params", "scale"):
            kind = QUANTIZED_DTYPES[self.quantization or "int8"]
            self.embedding = self.param("embedding", nn.with_logical_partitioning(
                nn.initializers.zeros, ("vocab", "embed")), shape, kind)
            self.scale = self.param("scale", nn.with_logical_partitioning(
                nn.initializers.ones, ("vocab",)), shape[:1], jnp.float32)
        else:
            self.embedding = self.param("embedding", nn.with_logical_partitioning(
                nn.initializers.normal(self.init_std), ("vocab", "embed")), shape,
                self.param_dtype)
            self.scale = None

    def __call__(self, ids: Array) -> Array:
        rows = jnp.take(self.embedding, ids, axis=0)  # [..., D]
        if self.scale is not None:  # exact int8 -> float32, times the row's scale, in float32
            rows = rows.astype(jnp.float32) * jnp.take(self.scale, ids, axis=0)[..., None]
        return rows.astype(self.dtype)

    def weights(self):
        """(table [V, D], scale [V] float32 or None) as the parameter tree holds them."""
        return self.embedding, self.scale


class Attention(nn.Module):
    config: Jais2Config
    settings: Settings

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache):
        c, st = self.config, self.settings
        impl = st.options.attention_impl
        kw = dict(use_bias=c.attention_bias, init_std=c.initializer_range)
        h, kv = c.num_attention_heads, c.num_key_value_heads
        if st.options.fuse_qkv:  # one GEMM (see unstack_layers(fuse_qkv=True))
            qkv = st.linear("qkv_proj", (h + 2 * kv, c.head_dim), ("embed",),
                            ("qkv_heads", "head_dim"), **kw)(x)  # [B, T, H + 2 KV, hd]
            q, k, v = jnp.split(qkv, (h, h + kv), axis=2)
        else:
            q = st.linear("q_proj", (h, c.head_dim), ("embed",), ("heads", "head_dim"),
                          tag=False, **kw)(x)  # [B, T, H, hd]
            k = st.linear("k_proj", (kv, c.head_dim), ("embed",), ("kv_heads", "head_dim"),
                          tag=False, **kw)(x)  # [B, T, KV, hd]
            v = st.linear("v_proj", (kv, c.head_dim), ("embed",), ("kv_heads", "head_dim"),
                          **kw)(x)
        # q and k are tagged (saved by the `dots` policies) after RoPE: what attention's backward
        # reads, so the rotation is not recomputed there (RoPE's own backward needs no input)
        q = checkpoint_name(apply_rope(q, cos, sin), "q_proj")
        k = checkpoint_name(apply_rope(k, cos, sin), "k_proj")
        q = _constrain(q, ("batch", "length", "heads", "head_dim"))
        k = _constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = _constrain(v, ("batch", "length", "kv_heads", "head_dim"))

        if layer_cache is None:
            out = dot_product_attention(q, k, v, kv_mask=mask["kv_mask"],
                                        segment_ids=mask["segment_ids"], implementation=impl)
            new_cache = None
        else:
            start = mask["cache_lengths"]  # [B]: first slot this chunk writes

            def write(buf, new):
                zeros = (0,) * (buf.ndim - 2)
                return jax.vmap(lambda b, n, s: jax.lax.dynamic_update_slice(b, n, (s,) + zeros))(
                    buf, new.astype(buf.dtype), start)

            if len(layer_cache) == 4:  # int8: values [B, S, KV, hd] and scales [B, S, KV]
                (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
                k_q, v_q, k_s, v_s = (write(b, n) for b, n in zip(layer_cache, (kq, vq, ks, vs)))
                new_cache = (k_q, v_q, k_s, v_s)
                k_cache, v_cache = dequantize_kv(k_q, k_s, q.dtype), dequantize_kv(v_q, v_s, q.dtype)
            else:
                k_cache, v_cache = layer_cache  # [B, S, KV, hd]
                k_cache, v_cache = write(k_cache, k), write(v_cache, v)
                new_cache = (k_cache, v_cache)
            if "chunk_lengths" in mask:
                # Prefill of an empty cache: the chunk is all there is to attend to, causal from
                # slot 0, which the flash kernel covers (attention over the cache would not).
                out = dot_product_attention(q, k, v, kv_lengths=mask["chunk_lengths"],
                                            implementation=impl)
            else:
                out = dot_product_attention(
                    q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), q_offset=start,
                    kv_lengths=start + q.shape[1], implementation=impl)
        out = _constrain(out, ("batch", "length", "heads", "head_dim"))  # tagged in attention.py
        y = st.linear("o_proj", (c.hidden_size,), ("heads", "head_dim"), ("embed",), **kw)(out)
        return y, new_cache


class MLP(nn.Module):
    config: Jais2Config
    settings: Settings

    @nn.compact
    def __call__(self, x):
        c, st = self.config, self.settings
        kw = dict(use_bias=c.mlp_bias, init_std=c.initializer_range)
        if c.hidden_act == "relu2":  # bias and activation in one function (Epilogue.activation)
            h = st.linear("up_proj", (c.intermediate_size,), ("embed",), ("mlp",),
                          activation="relu2", kernels=st.options.kernels, **kw)(x)
        else:
            h = ACTIVATIONS[c.hidden_act](
                st.linear("up_proj", (c.intermediate_size,), ("embed",), ("mlp",), **kw)(x))
        h = _constrain(h, ("batch", "length", "mlp"))
        return st.linear("down_proj", (c.hidden_size,), ("mlp",), ("embed",), **kw)(h)


class DecoderLayer(nn.Module):
    config: Jais2Config
    settings: Settings

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache):
        c, st = self.config, self.settings
        norm = dict(eps=c.layer_norm_eps, dtype=st.dtype, param_dtype=st.param_dtype,
                    impl=st.options.kernels)
        x = checkpoint_name(_constrain(x, ("batch", "length", "embed")), "layer_input")
        h = LayerNorm(name="input_layernorm", **norm)(x)
        h, new_cache = Attention(c, st, name="self_attn")(h, cos, sin, mask, layer_cache)
        x = x + h
        h = LayerNorm(name="post_attention_layernorm", **norm)(x)
        x = x + MLP(c, st, name="mlp")(h)
        return _constrain(x, ("batch", "length", "embed")), new_cache


class Jais2ForCausalLM(nn.Module):
    """`model.apply({"params": p}, input_ids, attention_mask=mask)` -> logits [B, T, V] float32.

    With `cache=` a KVCache, returns `(logits, new_cache)`; the chunk's tokens are written after
    each row's cached tokens and `attention_mask` (right-padded) says which of them are real.
    Without a cache, positions default to 0..T-1 as in transformers' forward; `segment_ids`
    [B, T] makes packed documents attend only within themselves (pass matching `positions`);
    without a cache `attention_mask` may also be [B, T, T] bool, which keys each query may see on
    top of causality (as transformers' custom masks; the evaluation packs answers this way).

    `options` (ModelOptions) holds the implementation knobs; `quantization` ("int8", "fp8", or
    "nf4": the decoder projections in NF4, an untied lm_head and a quantized table in int8) and
    `lora` (a LoraSpec on `lora_targets`) say which weights `init` creates in the projections
    (the matmul seam, `linear.py`); `quantize_embedding` (with `quantization`) makes `init`
    create a quantized embedding table too (QLoRA's base); `apply` follows the parameter tree.
    """
    config: Jais2Config
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    options: ModelOptions = ModelOptions()
    quantization: str | None = None
    lora: LoraSpec | None = None
    lora_targets: tuple[str, ...] = LORA_TARGETS
    quantize_embedding: bool = False

    # Read-only views of the options, for code that asks the model how it runs.
    @property
    def scan_layers(self) -> bool:
        return self.options.scan_layers

    def with_options(self, **changes) -> "Jais2ForCausalLM":
        """This model with some options changed (e.g. `with_options(scan_layers=False)`)."""
        return self.clone(options=self.options.replace(**changes))

    def setup(self):
        c, opts = self.config, self.options
        if self.quantization is not None and self.quantization not in QUANTIZED_DTYPES:
            raise ValueError(f"quantization {self.quantization!r}: choose one of "
                             f"{sorted(QUANTIZED_DTYPES)} or None")
        unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if unknown:
            raise ValueError(f"lora target modules {unknown}: choose among {list(LORA_TARGETS)}")
        if self.lora is not None and opts.fuse_qkv:
            raise ValueError("a LoRA adapter needs the separate q/k/v projections (fuse_qkv off)")
        st = Settings(self.dtype, self.param_dtype, opts, self.quantization, self.lora,
                      tuple(self.lora_targets))
        if self.quantize_embedding and self.quantization is None:
            raise ValueError("quantize_embedding needs a quantization scheme (int8, fp8 or nf4)")
        table = TABLE_SCHEME.get(self.quantization)  # nf4: the vocabulary tables in int8
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, self.dtype, self.param_dtype,
                                  c.initializer_range, table if self.quantize_embedding else None)
        layer_cls = DecoderLayer
        if opts.remat_policy != "none":
            layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[opts.remat_policy],
                                 prevent_cse=not opts.scan_layers)
        if opts.scan_layers:
            self.layers = nn.scan(
                layer_cls, variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},  # dropout: LoRA adapters
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), out_axes=0,
                length=c.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, st, name="layers")
        else:
            self.layers = [layer_cls(c, st, name=f"layers_{i}")
                           for i in range(c.num_hidden_layers)]
        self.norm = LayerNorm(c.layer_norm_eps, self.dtype, self.param_dtype, opts.kernels)
        if not c.tie_word_embeddings:
            # An untied lm_head is quantized with the projections; it never carries an adapter.
            self.lm_head = dataclasses.replace(st, lora=None, quantization=table).linear(
                "lm_head", (c.vocab_size,), ("embed",), ("vocab",), use_bias=False,
                init_std=c.initializer_range, float32_output=True)

    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None,
                 cache: KVCache | None = None, prefill: bool = False):
        hidden, new_cache = self.hidden_states(input_ids, attention_mask, positions=positions,
                                               segment_ids=segment_ids, cache=cache,
                                               prefill=prefill)
        logits = self.logits(hidden)
        return logits if cache is None else (logits, new_cache)

    def hidden_states(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None,
                      cache: KVCache | None = None, prefill: bool = False):
        """Final-norm hidden states [B, T, D] (and the new cache): the loss wants these, so that
        it can make the 150k-vocab logits a chunk at a time.

        `prefill=True` promises that `cache` is empty (all lengths 0), so attention stays within
        the chunk (GPU: the flash kernel) instead of reading the whole cache."""
        batch, length = input_ids.shape
        x = self.embed_tokens(input_ids)  # [B, T, D]
        if cache is not None:
            if attention_mask is not None and attention_mask.ndim != 2:
                raise ValueError("with a KV cache, attention_mask is [batch, length] (which "
                                 f"tokens are real), got shape {attention_mask.shape}")
            if segment_ids is not None:
                raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
            if length > cache.max_length:
                raise ValueError(f"a chunk of {length} tokens does not fit a cache of "
                                 f"{cache.max_length} slots")
            # Writes past max_length would be clamped onto the last slot (dynamic_update_slice):
            # callers keep lengths + new tokens <= max_length, as `generate` checks up front.
            real = (jnp.ones((batch, length), jnp.int32) if attention_mask is None
                    else attention_mask.astype(jnp.int32))
            positions = cache.lengths[:, None] + jnp.arange(length)[None, :]
            # Padded columns of the chunk must not count as length (dynamic/longrope RoPE).
            rope_len = jnp.max(cache.lengths + real.sum(axis=1))
            mask = {"cache_lengths": cache.lengths}
            if prefill:
                mask["chunk_lengths"] = real.sum(axis=1)
        else:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length))
            rope_len = None  # max(positions) + 1, as transformers' forward
            mask = {"kv_mask": attention_mask, "segment_ids": segment_ids}
        cos, sin = rope_cos_sin(self.config, positions, rope_len)  # [B, T, head_dim] float32

        layer_caches = None if cache is None else cache.layer_arrays()
        if self.options.scan_layers and cache is not None and cache.per_layer:
            raise ValueError("a per-layer KV cache needs scan_layers=False; use "
                             "init_cache(..., per_layer=False) with scan_layers=True")
        if self.options.scan_layers:
            x, layer_caches = self.layers(x, cos, sin, mask, layer_caches)
        else:
            new = []  # per layer: (k, v) or (k, v, k_scale, v_scale)
            for i, layer in enumerate(self.layers):
                lc = None if cache is None else tuple(a[i] for a in layer_caches)
                x, lc = layer(x, cos, sin, mask, lc)
                new.append(lc)
            if cache is not None:
                join = tuple if cache.per_layer else jnp.stack
                layer_caches = tuple(join(arrays) for arrays in zip(*new))
        x = self.norm(x)
        new_cache = None
        if cache is not None:
            scales = dict(k_scale=layer_caches[2], v_scale=layer_caches[3]) \
                if cache.quantized else {}
            new_cache = KVCache(k=layer_caches[0], v=layer_caches[1],
                                lengths=cache.lengths + real.sum(axis=1), **scales)
        return x, new_cache

    def lm_head_weight(self):
        """The output projection as a dense [D, V] array in the parameter dtype (the tied embedding
        table transposed). A quantized one is a ValueError: see `output_projection`."""
        w, scale = self.output_projection()
        if scale is not None:
            raise ValueError("the lm_head is quantized: use output_projection() (values, scale)")
        return w

    def output_projection(self):
        """(w [D, V], scale [V] float32 or None): the output projection as the tree holds it, so
        that the fused training loss makes its own chunked logits, `(h . w) * scale` for a
        quantized one (the tied embedding table transposed, its per-row scales per vocab column)."""
        if self.config.tie_word_embeddings:
            table, scale = self.embed_tokens.weights()
            return table.T, scale
        params = self.lm_head.variables["params"]
        return params["kernel"], params.get("scale")

    def logits(self, hidden):
        """[..., D] -> float32 logits [..., V]."""
        if self.config.tie_word_embeddings:
            table, scale = self.embed_tokens.weights()  # [V, D]
            logits = dot_f32(hidden.astype(self.dtype), table.astype(self.dtype),
                             ((hidden.ndim - 1,), (1,)))
            if scale is not None:  # the int8 values convert exactly; the scale per vocab column
                logits = logits * scale
        else:
            logits = self.lm_head(hidden.astype(self.dtype))
        return _constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
