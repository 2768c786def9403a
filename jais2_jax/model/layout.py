"""The parameter tree's two views: stacked `layers` (scan, checkpoints) and per-layer `layers_i`
(GPU decoding), with q/k/v optionally fused; and random parameters of the stacked layout."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jais2_jax.model.config import Jais2Config
from jais2_jax.model.modules import Jais2ForCausalLM

Array = jax.Array

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
