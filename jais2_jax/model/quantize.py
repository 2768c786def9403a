"""Weight-only quantization of the projections: int8 (the default) and fp8 (e4m3) values with one
float32 scale per output channel, and nf4 (QLoRA's 4-bit NormalFloat, from qwix) with one scale
per block of 64 inputs and output channel.

For a projection weight W (HF layout [out, in]; ours [in..., out...]):

    scale[j] = max_i |W[j, i]| / QMAX          (QMAX = 127 for int8, 448 for fp8 e4m3)
    q        = round(W / scale)                (int8: round half to even, clipped to [-127, 127];
                                                fp8: the nearest e4m3 value)

and the projection computes `(x @ q) * scale + bias`, accumulating in float32 (`linear.py`). Every
decoder projection (q, k, v, o, up, down, or a fused qkv) and an untied `lm_head` are quantized;
embeddings, norms and biases stay as they are. A channel of zeros gets scale 1 (q = 0).

nf4 (`qwix.quantize(w, "nf4", tiled_axes=...)`): the contracted dims are flattened and cut into
blocks of 64 (`linear.NF4_BLOCK`); `scale[b, j] = max |W[block b, j]|` and each weight becomes
the 4-bit code of the nearest of the 16 NF4 values to W / scale (QLoRA's table, Dettmers et al.
2023, appendix E); the projection computes `x @ (NF4[code] * scale) + bias`. The scales stay
float32 (bitsandbytes' "double quantization" of them is not done). An untied lm_head (and
`quantize_embedding`'s table) are int8 under nf4 (`linear.TABLE_SCHEME`).

`quantize_embedding` (QLoRA's frozen base, `training/lora.py`) also quantizes the input embedding
table E [vocab, embed] with one scale per row (per token): `scale[v] = max_d |E[v, d]| / QMAX`.
The lookup gathers int8 rows and scales them; a tied lm_head (E transposed) is then per output
channel, as the projections are.

`quantize(params, "int8")` takes the stacked tree, the per-layer view (`unstack_layers`) or a
fused-qkv view, on one device or sharded on a mesh: the values keep the weight's sharding, the
scales take the sharding of the weight's output axes (nf4's block axis is replicated).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jais2_jax.model.linear import (
    NF4_BLOCK,
    QUANTIZED_DTYPES,
    TABLE_SCHEME,
    nf4_blocks,
    nf4_dequantize,
)

SCHEMES = tuple(QUANTIZED_DTYPES)  # ("int8", "fp8", "nf4")
QMAX = {"int8": 127.0, "fp8": float(jnp.finfo(jnp.float8_e4m3fn).max)}  # 448
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "up_proj", "down_proj",
               "lm_head")
EMBEDDING = "embed_tokens"  # its table: {"embedding": [vocab, embed]} (+ "scale" [vocab])


def contracted_dims(name: str) -> int:
    """How many leading (input) dims of the projection's kernel the product contracts."""
    return 2 if name == "o_proj" else 1  # o_proj: (heads, head_dim) -> embed


def check_scheme(scheme) -> str:
    if scheme not in QUANTIZED_DTYPES:
        raise ValueError(f"quantization scheme {scheme!r}: choose one of {list(SCHEMES)}")
    return scheme


def quantize_array(w, scheme: str, *, leading: int = 0, n_in: int = 1):
    """(values, scale) of one kernel [lead..., in..., out...]: the scale reduces the `n_in`
    input dims after `leading` stacked dims. numpy or jax input; float32 math either way."""
    check_scheme(scheme)
    if scheme == "nf4":
        return _quantize_nf4(w, leading, n_in)
    xp = np if isinstance(w, np.ndarray) else jnp
    w = w.astype(xp.float32)
    axes = tuple(range(leading, leading + n_in))
    amax = xp.max(xp.abs(w), axis=axes, keepdims=True)
    scale = xp.where(amax > 0, amax / QMAX[scheme], 1.0).astype(xp.float32)
    if scheme == "int8":
        q = xp.clip(xp.round(w / scale), -127, 127).astype(xp.int8)  # round half to even
    else:
        q = (w / scale).astype(QUANTIZED_DTYPES[scheme])
    return q, xp.squeeze(scale, axis=axes)


def _quantize_nf4(w, leading: int, n_in: int):
    """(codes uint4 [lead..., in..., out...], scales float32 [lead..., blocks, out...]) by qwix,
    always inside a jit: run op by op, qwix's nearest-code search would hold a float32 array 16
    times the weight's size (2.2 GB for a 67 MB weight on the CPU, 250 MB jitted)."""
    nf4_blocks(w.shape[leading:leading + n_in], f"a weight of shape {tuple(w.shape)}")
    if isinstance(w, jax.core.Tracer):
        return _nf4_codes(w, leading, n_in)
    codes, scale = _nf4_codes_jit(jnp.asarray(w), leading, n_in)
    return (np.asarray(codes), np.asarray(scale)) if isinstance(w, np.ndarray) else (codes, scale)


def _nf4_codes(w, leading: int, n_in: int):
    import qwix
    shape = w.shape
    flat = w.astype(jnp.float32).reshape(shape[:leading] + (-1,) + shape[leading + n_in:])
    other = tuple(i for i in range(flat.ndim) if i != leading)
    q = qwix.quantize(flat, "nf4", channelwise_axes=other, tiled_axes={leading: NF4_BLOCK})
    return q.qvalue.reshape(shape), q.scale.astype(jnp.float32)


_nf4_codes_jit = jax.jit(_nf4_codes, static_argnums=(1, 2))


def dequantize_array(q, scale, *, leading: int = 0, n_in: int = 1):
    """q * scale in float32 (the dense weight the quantized projection applies)."""
    if jnp.dtype(q.dtype) == QUANTIZED_DTYPES["nf4"]:
        w = nf4_dequantize(jnp.asarray(q), jnp.asarray(scale), leading=leading, n_in=n_in)
        return np.asarray(w) if isinstance(q, np.ndarray) else w
    xp = np if isinstance(q, np.ndarray) else jnp
    axes = tuple(range(leading, leading + n_in))
    return q.astype(xp.float32) * xp.expand_dims(scale, axes)


def is_quantized(params) -> bool:
    return any(_is_projection_path(path) and path[-1] == "scale"
               for path in _paths(params))


def is_embedding_quantized(params) -> bool:
    return "scale" in params.get(EMBEDDING, {})


def quantize_embedding(params: dict, scheme: str = "int8") -> dict:
    """The tree with the input embedding table as `scheme` values [vocab, embed] + one float32
    scale per row [vocab] (the table's sharding kept; the scales sharded like its vocab axis).
    Refuses a table that is already quantized."""
    scheme = TABLE_SCHEME[check_scheme(scheme)]  # nf4: the table in int8
    if is_embedding_quantized(params):
        raise ValueError("the embedding table is already quantized (embed_tokens holds 'scale')")
    table = params[EMBEDDING]["embedding"]  # [V, D]: the scale reduces D (leading=1)
    fn = lambda w: quantize_array(w, scheme, leading=1)  # noqa: E731
    sharding = getattr(table, "sharding", None)
    if isinstance(table, jax.Array) and isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (table.ndim - len(sharding.spec))
        q, scale = jax.jit(fn, out_shardings=(sharding, NamedSharding(
            sharding.mesh, PartitionSpec(spec[0]))))(table)
    elif isinstance(table, jax.Array):
        q, scale = jax.jit(fn)(table)
    else:
        q, scale = fn(np.asarray(table))
    return {**params, EMBEDDING: {**params[EMBEDDING], "embedding": q, "scale": scale}}


def quantize(params: dict, scheme: str = "int8") -> dict:
    """The tree with every projection's kernel replaced by `scheme` values + per-channel scales.

    For `Jais2ForCausalLM(config, quantization=scheme)`, or the plain model: the projections
    follow the tree. Refuses a tree that is already quantized."""
    check_scheme(scheme)
    if is_quantized(params):
        raise ValueError("these parameters are already quantized (their projections hold "
                         "'scale'); quantize the original weights instead")
    return _map_projections(params, lambda name, p, leading: _quantize_projection(
        name, p, leading, scheme))


def dequantize(params: dict) -> dict:
    """The dense float32 tree a quantized tree applies (for checks and exports); a quantized
    embedding table too."""
    def dense(name, p, leading):
        if "scale" not in p:
            return p
        w = dequantize_array(p["kernel"], p["scale"], leading=leading,
                             n_in=contracted_dims(name))
        return {**{k: v for k, v in p.items() if k != "scale"}, "kernel": w}
    out = _map_projections(params, dense)
    if is_embedding_quantized(out):
        table = out[EMBEDDING]
        out[EMBEDDING] = {**{k: v for k, v in table.items() if k != "scale"},
                          "embedding": dequantize_array(table["embedding"], table["scale"],
                                                        leading=1)}
    return out


def projection_scheme(name: str, scheme: str) -> str:
    """The scheme a projection takes under `scheme` (nf4: an untied lm_head in int8)."""
    return TABLE_SCHEME[scheme] if name == "lm_head" else scheme


def _quantize_projection(name: str, p: dict, leading: int, scheme: str) -> dict:
    kernel = p["kernel"]
    n_in = contracted_dims(name)
    scheme = projection_scheme(name, scheme)
    fn = lambda w: quantize_array(w, scheme, leading=leading, n_in=n_in)  # noqa: E731
    sharding = getattr(kernel, "sharding", None)
    if isinstance(kernel, jax.Array) and isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (kernel.ndim - len(sharding.spec))
        blocks = (None,) if scheme == "nf4" else ()  # nf4's block axis: replicated
        scale_spec = PartitionSpec(*(spec[:leading] + blocks + spec[leading + n_in:]))
        q, scale = jax.jit(fn, out_shardings=(sharding, NamedSharding(sharding.mesh,
                                                                      scale_spec)))(kernel)
    elif isinstance(kernel, jax.Array):
        q, scale = jax.jit(fn)(kernel)
    else:
        q, scale = fn(np.asarray(kernel))
    return {**p, "kernel": q, "scale": scale}


def _map_projections(params: dict, fn) -> dict:
    """fn(name, projection dict, leading) on every projection of a stacked (`layers`, leading 1)
    or per-layer (`layers_i`, leading 0) tree; other leaves unchanged."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key == "lm_head" and isinstance(value, dict) and "kernel" in value:
            out[key] = fn(key, dict(value), 0)
        elif key == "layers" or key.startswith("layers_"):
            leading = 1 if key == "layers" else 0
            out[key] = {block: ({name: (fn(name, dict(p), leading) if name in PROJECTIONS else p)
                                 for name, p in sub.items()} if isinstance(sub, dict) else sub)
                        for block, sub in value.items()}
        else:
            out[key] = value
    return out


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, prefix + (k,))
    else:
        yield prefix


def _is_projection_path(path) -> bool:
    return len(path) >= 2 and path[-2] in PROJECTIONS
