"""Jais2 decoder in Flax linen, numerically the function of transformers' Jais2ForCausalLM.

Layer: LayerNorm -> attention (q/k/v/o with biases, GQA, rotate-half RoPE) -> residual ->
LayerNorm -> MLP down(relu(up(x))^2) -> residual. Final LayerNorm, lm_head (or the tied embedding).

Parameters carry logical axis names (`vocab, embed, heads, kv_heads, head_dim, mlp, layers`).
With `scan_layers=True` (the default and the one on-disk layout) the layers are one `nn.scan`
over a leading `layers` axis. `scan_layers=False` runs the same layer code over per-layer arrays
(`unstack_layers(params)`), which GPU decoding wants: slicing a layer out of a stacked weight inside
jit makes XLA copy it before the GEMM.

Numerics: parameters in `param_dtype`, activations in `dtype`; matmuls accumulate in float32,
LayerNorm statistics, RoPE, softmax and the logits are float32.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jais2_jax.kernels.bias_relu2 import bias_relu2
from jais2_jax.kernels.bias_relu2 import slope as relu2_slope
from jais2_jax.kernels.layernorm import layer_norm
from jais2_jax.model.attention import dot_product_attention
from jais2_jax.model.cache import KVCache
from jais2_jax.model.config import Jais2Config
from jais2_jax.model.rope import apply_rope, rope_cos_sin

Array = jax.Array


@jax.custom_vjp
def relu2(x: Array) -> Array:
    """relu(x)^2, Jais2's MLP activation, differentiated from its output: d/dx = 2 relu(x) =
    2 sqrt(relu(x)^2). The output (tagged "mlp_act") is what down_proj's weight gradient needs
    anyway, so a remat policy that saves it keeps one [tokens, intermediate] tensor per layer, and
    the backward pass neither keeps nor re-reads the up_proj output. On the H100 train step that is
    2 of the 7 GB a layer moves through the activation and its backward at batch 16.
    Reverse mode only (a custom_vjp: the output is its only residual)."""
    return jnp.square(jax.nn.relu(x))


def _relu2_fwd(x):
    y = checkpoint_name(relu2(x), "mlp_act")
    return y, y


def _relu2_bwd(y, g):
    # In the activation's dtype, as autodiff of the formula would compute 2 relu(x) g.
    return ((relu2_slope(y) * g.astype(y.dtype)).astype(g.dtype),)


relu2.defvjp(_relu2_fwd, _relu2_bwd)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu2": relu2,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}

# Every projection's output is tagged with its Linear's name (q_proj ... down_proj; q and k after
# RoPE) and the attention output with "attention" (jax.ad_checkpoint.checkpoint_name); for relu^2
# the activation's output is tagged "mlp_act" instead of up_proj's (see relu2). Policies save
# tags, not primitives: the dots sit inside a custom_vjp (dot_f32) and cuDNN attention is a custom
# call, so jax's primitive-based policies (checkpoint_dots) would see nothing to save.
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "mlp_act", "down_proj")
_save = jax.checkpoint_policies.save_only_these_names


def _cudnn_attention_forward(prim, *_, **__) -> bool:
    """Saves what cuDNN's attention forward returns: the output and the softmax statistics its
    backward kernel needs. Saving the output alone (a name) would still re-run the forward kernel
    for the statistics (9 ms a step on the H100 2B bench). attention.py therefore leaves the cuDNN
    output untagged, so it is not kept twice. The primitive's name is JAX's own
    (jax._src.cudnn.fused_attention_stablehlo); were it renamed, the forward would be re-run again,
    which costs time, not correctness."""
    return prim.name.startswith("dot_product_attention_fwd")


def _save_with_attention(*names):
    """Save these names, the "attention" output, and cuDNN attention's forward outputs."""
    return jax.checkpoint_policies.save_from_both_policies(_save(*names, "attention"),
                                                           _cudnn_attention_forward)


REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer
    "dots": _save_with_attention(*_PROJECTIONS),  # recompute only norms, RoPE, activation
    "dots_no_batch": _save(*_PROJECTIONS),  # as jax's: projections, not the attention
    "dots_no_mlp": _save_with_attention("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(dtype) -> jnp.dtype:
    """A jnp dtype from a name ("bfloat16") or a dtype."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
        return jnp.dtype(_DTYPES[dtype])
    return jnp.dtype(dtype)


def _constrain(x, axes):
    return nn.with_logical_constraint(x, axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dot_f32(x: Array, w: Array, contract) -> Array:
    """dot_general of x and w (same dtype) accumulated and returned in float32.

    The backward pass runs its two GEMMs in the inputs' dtype (the cotangent is cast down first):
    differentiating the float32 output naively would hand XLA float32 x bf16 products, which it
    runs as float32 GEMMs, several times slower than bf16 on GPU and TPU. The GEMM units still
    accumulate in float32; only dx and dw are rounded to the input dtype, as in torch autocast.
    """
    return jax.lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=jnp.float32)


def _dot_f32_fwd(x, w, contract):
    return dot_f32(x, w, contract), (x, w)


def _dot_f32_bwd(contract, res, g):
    x, w = res
    _, vjp = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, (contract, ((), ())),
                                                      preferred_element_type=x.dtype), x, w)
    return vjp(g.astype(x.dtype))


dot_f32.defvjp(_dot_f32_fwd, _dot_f32_bwd)


class Linear(nn.Module):
    """y = x . W (+ b), contracting the trailing `len(in_axes)` dims of x, accumulating in float32.

    The result is in `dtype`, or float32 with `float32_output` (the logits); the bias is added in
    float32."""
    features: tuple[int, ...]
    in_axes: tuple[str, ...]  # logical names of the contracted input dims
    out_axes: tuple[str, ...]  # logical names of the output dims
    use_bias: bool
    dtype: Any
    param_dtype: Any
    init_std: float
    float32_output: bool = False
    # tag the output with the Linear's name for the remat policies (q/k: Attention tags them
    # after RoPE instead)
    tag_output: bool = True
    # relu(y + b)^2 as the bias add (bias_relu2.py: its backward makes dy and db in one pass);
    # the activation, tagged "mlp_act" for the remat policies, is returned instead of y (which
    # the backward pass then never needs, so it is not tagged)
    fused_relu2: bool = False
    kernels: str | None = None  # bias_relu2's backward: Pallas on GPU (None), "xla", "pallas"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_in = len(self.in_axes)
        in_shape = x.shape[-n_in:]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                         self.in_axes + self.out_axes),
            in_shape + self.features, self.param_dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.float32_output:
            y = dot_f32(x, kernel, contract)
        else:
            # Output in the compute dtype; the GEMM still accumulates in float32 (cuBLAS, the TPU
            # MXU and XLA:CPU all do). Measured on an H200, the float32 output plus a separate
            # cast cost up to 15% on the decode GEMVs and 10% on prefill GEMMs.
            y = jax.lax.dot_general(x, kernel, (contract, ((), ())),
                                    preferred_element_type=self.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   self.out_axes),
                              self.features, self.param_dtype)
            if self.fused_relu2:
                return bias_relu2(y, bias, self.kernels)
            y = (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(y.dtype)
        if self.fused_relu2:
            return relu2(y)
        if self.float32_output:
            return y
        return checkpoint_name(y, self.name) if self.tag_output else y  # policies save by name


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm (weight `scale` and `bias`), statistics in float32 (`layernorm.py`:
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


class Attention(nn.Module):
    config: Jais2Config
    dtype: Any
    param_dtype: Any
    attention_impl: str | None
    fuse_qkv: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache):
        c = self.config
        kw = dict(use_bias=c.attention_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  init_std=c.initializer_range)
        h, kv = c.num_attention_heads, c.num_key_value_heads
        if self.fuse_qkv:  # one GEMM (see unstack_layers(fuse_qkv=True))
            qkv = Linear((h + 2 * kv, c.head_dim), ("embed",), ("qkv_heads", "head_dim"),
                         name="qkv_proj", **kw)(x)  # [B, T, H + 2 KV, hd]
            q, k, v = jnp.split(qkv, (h, h + kv), axis=2)
        else:
            q = Linear((h, c.head_dim), ("embed",), ("heads", "head_dim"),
                       name="q_proj", tag_output=False, **kw)(x)  # [B, T, H, hd]
            k = Linear((kv, c.head_dim), ("embed",), ("kv_heads", "head_dim"),
                       name="k_proj", tag_output=False, **kw)(x)  # [B, T, KV, hd]
            v = Linear((kv, c.head_dim), ("embed",), ("kv_heads", "head_dim"),
                       name="v_proj", **kw)(x)
        # q and k are tagged (saved by the `dots` policies) after RoPE: what attention's backward
        # reads, so the rotation is not recomputed there (RoPE's own backward needs no input)
        q = checkpoint_name(apply_rope(q, cos, sin), "q_proj")
        k = checkpoint_name(apply_rope(k, cos, sin), "k_proj")
        q = _constrain(q, ("batch", "length", "heads", "head_dim"))
        k = _constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = _constrain(v, ("batch", "length", "kv_heads", "head_dim"))

        if layer_cache is None:
            out = dot_product_attention(q, k, v, kv_mask=mask["kv_mask"],
                                        segment_ids=mask["segment_ids"],
                                        implementation=self.attention_impl)
            new_cache = None
        else:
            k_cache, v_cache = layer_cache  # [B, S, KV, hd]
            start = mask["cache_lengths"]  # [B]: first slot this chunk writes

            def write(buf, new):
                return jax.vmap(lambda b, n, s: jax.lax.dynamic_update_slice(b, n, (s, 0, 0)))(
                    buf, new.astype(buf.dtype), start)

            k_cache, v_cache = write(k_cache, k), write(v_cache, v)
            if "chunk_lengths" in mask:
                # Prefill of an empty cache: the chunk is all there is to attend to, causal from
                # slot 0, which the flash kernel covers (attention over the cache would not).
                out = dot_product_attention(q, k, v, kv_lengths=mask["chunk_lengths"],
                                            implementation=self.attention_impl)
            else:
                out = dot_product_attention(
                    q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), q_offset=start,
                    kv_lengths=start + q.shape[1], implementation=self.attention_impl)
            new_cache = (k_cache, v_cache)
        out = _constrain(out, ("batch", "length", "heads", "head_dim"))  # tagged in attention.py
        y = Linear((c.hidden_size,), ("heads", "head_dim"), ("embed",), name="o_proj", **kw)(out)
        return y, new_cache


class MLP(nn.Module):
    config: Jais2Config
    dtype: Any
    param_dtype: Any
    kernels: str | None = None

    @nn.compact
    def __call__(self, x):
        c = self.config
        kw = dict(use_bias=c.mlp_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  init_std=c.initializer_range)
        up = functools.partial(Linear, (c.intermediate_size,), ("embed",), ("mlp",),
                               name="up_proj", **kw)
        if c.hidden_act == "relu2":  # bias and activation in one function (Linear.fused_relu2)
            h = up(fused_relu2=True, kernels=self.kernels)(x)
        else:
            h = ACTIVATIONS[c.hidden_act](up()(x))
        h = _constrain(h, ("batch", "length", "mlp"))
        return Linear((c.hidden_size,), ("mlp",), ("embed",), name="down_proj", **kw)(h)


class DecoderLayer(nn.Module):
    config: Jais2Config
    dtype: Any
    param_dtype: Any
    attention_impl: str | None = None
    kernels: str | None = None
    fuse_qkv: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache):
        c = self.config
        norm = dict(eps=c.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                    impl=self.kernels)
        x = _constrain(x, ("batch", "length", "embed"))
        h = LayerNorm(name="input_layernorm", **norm)(x)
        h, new_cache = Attention(c, self.dtype, self.param_dtype, self.attention_impl, self.fuse_qkv,
                                 name="self_attn")(h, cos, sin, mask, layer_cache)
        x = x + h
        h = LayerNorm(name="post_attention_layernorm", **norm)(x)
        x = x + MLP(c, self.dtype, self.param_dtype, self.kernels, name="mlp")(h)
        return _constrain(x, ("batch", "length", "embed")), new_cache


class Jais2ForCausalLM(nn.Module):
    """`model.apply({"params": p}, input_ids, attention_mask=mask)` -> logits [B, T, V] float32.

    With `cache=` a KVCache, returns `(logits, new_cache)`; the chunk's tokens are written after
    each row's cached tokens and `attention_mask` (right-padded) says which of them are real.
    Without a cache, positions default to 0..T-1 as in transformers' forward; `segment_ids`
    [B, T] makes packed documents attend only within themselves (pass matching `positions`).
    """
    config: Jais2Config
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str | None = None  # None: by backend (cuDNN on GPU for bf16, XLA otherwise)
    # LayerNorm and the MLP's bias + relu^2 backward: Pallas kernels on GPU (None; per device on a
    # mesh), "xla" or "pallas" (layernorm.py, bias_relu2.py)
    kernels: str | None = None
    # Inference on one device: q/k/v as one GEMM over params from unstack_layers(fuse_qkv=True).
    # The fused heads axis is replicated by the sharding rules, so keep it off under tensor parallelism.
    fuse_qkv: bool = False

    def setup(self):
        c = self.config
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r}: choose one of "
                             f"{sorted(REMAT_POLICIES)}")
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(c.initializer_range), ("vocab", "embed")))
        layer_cls = DecoderLayer
        if self.remat_policy != "none":
            layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[self.remat_policy],
                                 prevent_cse=not self.scan_layers)
        if self.fuse_qkv and self.scan_layers:
            raise ValueError("fuse_qkv is an inference layout: use it with scan_layers=False and "
                             "unstack_layers(params, fuse_qkv=True)")
        layer_kw = dict(config=c, dtype=self.dtype, param_dtype=self.param_dtype,
                        attention_impl=self.attention_impl, kernels=self.kernels,
                        fuse_qkv=self.fuse_qkv)
        if self.scan_layers:
            self.layers = nn.scan(
                layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), out_axes=0,
                length=c.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"},
            )(**layer_kw, name="layers")
        else:
            self.layers = [layer_cls(**layer_kw, name=f"layers_{i}")
                           for i in range(c.num_hidden_layers)]
        self.norm = LayerNorm(c.layer_norm_eps, self.dtype, self.param_dtype, self.kernels)
        if not c.tie_word_embeddings:
            self.lm_head = Linear((c.vocab_size,), ("embed",), ("vocab",), use_bias=False,
                                  dtype=self.dtype, param_dtype=self.param_dtype,
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

        layer_caches = None if cache is None else (cache.k, cache.v)
        if self.scan_layers and cache is not None and cache.per_layer:
            raise ValueError("a per-layer KV cache needs scan_layers=False; use "
                             "init_cache(..., per_layer=False) with scan_layers=True")
        if self.scan_layers:
            x, layer_caches = self.layers(x, cos, sin, mask, layer_caches)
        else:
            new_k, new_v = [], []
            for i, layer in enumerate(self.layers):
                lc = None if cache is None else (cache.k[i], cache.v[i])
                x, lc = layer(x, cos, sin, mask, lc)
                if lc is not None:
                    new_k.append(lc[0])
                    new_v.append(lc[1])
            if cache is not None and cache.per_layer:
                layer_caches = (tuple(new_k), tuple(new_v))
            elif cache is not None:
                layer_caches = (jnp.stack(new_k), jnp.stack(new_v))
        x = self.norm(x)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=layer_caches[0], v=layer_caches[1],
                                lengths=cache.lengths + real.sum(axis=1))
        return x, new_cache

    def lm_head_weight(self):
        """The output projection as a [D, V] array in the parameter dtype (the tied embedding
        table transposed): the fused training loss makes its own chunked logits from it."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.embedding.T
        return self.lm_head.variables["params"]["kernel"]

    def logits(self, hidden):
        """[..., D] -> float32 logits [..., V]."""
        if self.config.tie_word_embeddings:
            table = self.embed_tokens.embedding  # [V, D]
            logits = dot_f32(hidden.astype(self.dtype), table.astype(self.dtype),
                             ((hidden.ndim - 1,), (1,)))
        else:
            logits = self.lm_head(hidden.astype(self.dtype))
        return _constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


# ------------------------------------------------------------------------------ parameter layout
_QKV = ("q_proj", "k_proj", "v_proj")


def unstack_layers(params: dict, *, fuse_qkv: bool = False) -> dict:
    """The per-layer view of a scanned tree (`layers` -> `layers_0..N-1`), for scan_layers=False.

    With `fuse_qkv`, each layer's q/k/v kernels [D, H|KV, hd] (and biases) are concatenated along
    the heads axis into one `qkv_proj` [D, H + 2 KV, hd], for Jais2ForCausalLM(fuse_qkv=True):
    one GEMM instead of three, which matters most when decoding a few rows at a time.
    """
    params = dict(params)
    stacked = params.pop("layers")
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    for i in range(n):
        layer = jax.tree_util.tree_map(lambda a: a[i], stacked)
        if fuse_qkv:
            attn = dict(layer["self_attn"])
            parts = [attn.pop(name) for name in _QKV]
            attn["qkv_proj"] = {key: jnp.concatenate([p[key] for p in parts], axis=-2)
                                for key in parts[0]}  # kernel [D, *, hd], bias [*, hd]
            layer = {**layer, "self_attn": attn}
        params[f"layers_{i}"] = layer
    return params


def stack_layers(params: dict, config: Jais2Config | None = None) -> dict:
    """Inverse of `unstack_layers`; a fused qkv_proj needs the config to be split again."""
    params = dict(params)
    names = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k[7:]))
    layers = [params.pop(k) for k in names]
    if layers and "qkv_proj" in layers[0]["self_attn"]:
        if config is None:
            raise ValueError("these layers hold a fused qkv_proj: pass the config to split it")
        bounds = (config.num_attention_heads, config.num_attention_heads + config.num_key_value_heads)
        for j, layer in enumerate(layers):
            attn = dict(layer["self_attn"])
            fused = attn.pop("qkv_proj")
            split = {key: jnp.split(value, bounds, axis=-2) for key, value in fused.items()}
            for i, name in enumerate(_QKV):
                attn[name] = {key: parts[i] for key, parts in split.items()}
            layers[j] = {**layer, "self_attn": attn}
    params["layers"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layers)
    return params


def init_params(config: Jais2Config, rng: Array, *, param_dtype=jnp.float32) -> dict:
    """Random parameters (unboxed) of the scanned layout."""
    model = Jais2ForCausalLM(config, param_dtype=param_dtype)
    variables = model.init(rng, jnp.zeros((1, 1), jnp.int32))
    return nn.meta.unbox(variables["params"])
