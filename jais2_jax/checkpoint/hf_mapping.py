"""The one place that knows transformers' tensor names: HF state dict <-> our parameter tree.

Each parameter of our (scanned) tree has a `TensorSpec`: its path, the HF name (with `{i}` for the
layer index when stacked) and the reshape between the HF `[out, in]` layout and ours. The file
converter streams through these specs one tensor at a time; `params_from_state_dict` and
`state_dict_from_params` are the in-memory versions.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from jais2_jax.model.config import Jais2Config


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    path: tuple[str, ...]  # path in our params tree
    hf_name: str  # "model.layers.{i}.mlp.up_proj.weight" for stacked tensors
    stacked: bool  # one HF tensor per layer, stacked on a leading `layers` axis here
    hf_shape: tuple[int, ...]  # one HF tensor (one layer)
    our_shape: tuple[int, ...]  # one layer's slice of ours (without the layers axis)
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]

    def hf_names(self, num_layers: int) -> list[str]:
        return [self.hf_name.format(i=i) for i in range(num_layers)] if self.stacked else [self.hf_name]

    def full_shape(self, num_layers: int) -> tuple[int, ...]:
        return ((num_layers,) + self.our_shape) if self.stacked else self.our_shape


def identity(x):
    return x


def _linear(out_shape: tuple[int, ...], in_shape: tuple[int, ...]) -> tuple[Callable, Callable]:
    """HF weight [prod(out), prod(in)] <-> our kernel [*in, *out]."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))

    def to_ours(w):
        return np.ascontiguousarray(w.T).reshape(in_shape + out_shape)

    def to_hf(k):
        return np.ascontiguousarray(k.reshape(n_in, n_out).T)
    return to_ours, to_hf


def _reshape(hf_shape, our_shape):
    return (lambda b: b.reshape(our_shape)), (lambda b: b.reshape(hf_shape))


def tensor_specs(config: Jais2Config) -> list[TensorSpec]:
    c = config
    d, f, h, kv, hd, v = (c.hidden_size, c.intermediate_size, c.num_attention_heads,
                          c.num_key_value_heads, c.head_dim, c.vocab_size)
    specs: list[TensorSpec] = []

    def add(path, hf_name, stacked, hf_shape, our_shape, fns):
        specs.append(TensorSpec(tuple(path.split("/")), hf_name, stacked, tuple(hf_shape),
                                tuple(our_shape), *fns))

    add("embed_tokens/embedding", "model.embed_tokens.weight", False, (v, d), (v, d),
        (identity, identity))
    layer = "model.layers.{i}."
    for norm in ("input_layernorm", "post_attention_layernorm"):
        add(f"layers/{norm}/scale", f"{layer}{norm}.weight", True, (d,), (d,), (identity, identity))
        add(f"layers/{norm}/bias", f"{layer}{norm}.bias", True, (d,), (d,), (identity, identity))
    for name, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
        add(f"layers/self_attn/{name}/kernel", f"{layer}self_attn.{name}.weight", True,
            (heads * hd, d), (d, heads, hd), _linear((heads, hd), (d,)))
        if c.attention_bias:
            add(f"layers/self_attn/{name}/bias", f"{layer}self_attn.{name}.bias", True,
                (heads * hd,), (heads, hd), _reshape((heads * hd,), (heads, hd)))
    add("layers/self_attn/o_proj/kernel", f"{layer}self_attn.o_proj.weight", True,
        (d, h * hd), (h, hd, d), _linear((d,), (h, hd)))
    if c.attention_bias:
        add("layers/self_attn/o_proj/bias", f"{layer}self_attn.o_proj.bias", True, (d,), (d,),
            (identity, identity))
    add("layers/mlp/up_proj/kernel", f"{layer}mlp.up_proj.weight", True, (f, d), (d, f),
        _linear((f,), (d,)))
    add("layers/mlp/down_proj/kernel", f"{layer}mlp.down_proj.weight", True, (d, f), (f, d),
        _linear((d,), (f,)))
    if c.mlp_bias:
        add("layers/mlp/up_proj/bias", f"{layer}mlp.up_proj.bias", True, (f,), (f,),
            (identity, identity))
        add("layers/mlp/down_proj/bias", f"{layer}mlp.down_proj.bias", True, (d,), (d,),
            (identity, identity))
    add("norm/scale", "model.norm.weight", False, (d,), (d,), (identity, identity))
    add("norm/bias", "model.norm.bias", False, (d,), (d,), (identity, identity))
    if not c.tie_word_embeddings:
        add("lm_head/kernel", "lm_head.weight", False, (v, d), (d, v), _linear((v,), (d,)))
    return specs


def expected_hf_names(config: Jais2Config) -> set[str]:
    return {n for s in tensor_specs(config) for n in s.hf_names(config.num_hidden_layers)}


def optional_hf_names(config: Jais2Config) -> set[str]:
    """Names a checkpoint may carry that we do not need: a tied lm_head copy, rotary buffers."""
    extra = {TIED_HEAD} if config.tie_word_embeddings else set()
    return extra | {f"model.layers.{i}.self_attn.rotary_emb.inv_freq"
                    for i in range(config.num_hidden_layers)}


def check_hf_names(config: Jais2Config, names) -> None:
    """ValueError naming every missing or unexpected tensor."""
    names = set(names)
    expected = expected_hf_names(config)
    missing = sorted(expected - names)
    unexpected = sorted(names - expected - optional_hf_names(config))
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing[:8]}"
                        + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:8]}"
                        + (" ..." if len(unexpected) > 8 else ""))
    if problems:
        raise ValueError("checkpoint does not match the config: " + "; ".join(problems))


def check_hf_shape(spec: TensorSpec, name: str, shape) -> None:
    if tuple(shape) != spec.hf_shape:
        raise ValueError(f"tensor {name} has shape {tuple(shape)}, but the config implies "
                         f"{spec.hf_shape}")


def tree_set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def tree_get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def check_params(config: Jais2Config, params: Mapping) -> None:
    """ValueError naming every parameter of our tree that is missing, unexpected or misshapen."""
    from flax.traverse_util import flatten_dict
    n = config.num_hidden_layers
    expected = {"/".join(s.path): s.full_shape(n) for s in tensor_specs(config)}
    flat = {k: tuple(np.shape(v)) for k, v in flatten_dict(params, sep="/").items()}
    problems = [f"missing {k}" for k in sorted(set(expected) - set(flat))]
    problems += [f"unexpected {k}" for k in sorted(set(flat) - set(expected))]
    problems += [f"{k} has shape {flat[k]}, the config implies {expected[k]}"
                 for k in sorted(set(flat) & set(expected)) if flat[k] != expected[k]]
    if problems:
        raise ValueError("parameters do not match the config: " + "; ".join(problems[:8]))


TIED_HEAD = "lm_head.weight"


def tied_head_differs() -> ValueError:
    return ValueError(f"config.json says tie_word_embeddings=true, but the checkpoint's {TIED_HEAD} "
                      "differs from model.embed_tokens.weight (transformers then does not tie them); "
                      "set tie_word_embeddings to false in config.json")


def params_from_state_dict(config: Jais2Config, state_dict: Mapping[str, np.ndarray],
                           dtype=None) -> dict:
    """HF state dict (numpy arrays) -> our scanned params tree of numpy arrays."""
    check_hf_names(config, state_dict.keys())
    if config.tie_word_embeddings and TIED_HEAD in state_dict:  # a copy: it must be one
        if not np.array_equal(np.asarray(state_dict[TIED_HEAD]),
                              np.asarray(state_dict["model.embed_tokens.weight"])):
            raise tied_head_differs()
    params: dict = {}
    for spec in tensor_specs(config):
        parts = []
        for name in spec.hf_names(config.num_hidden_layers):
            t = np.asarray(state_dict[name])
            check_hf_shape(spec, name, t.shape)
            parts.append(spec.to_ours(t))
        arr = np.stack(parts) if spec.stacked else parts[0]
        tree_set(params, spec.path, arr if dtype is None else arr.astype(dtype))
    return params


def state_dict_from_params(config: Jais2Config, params: Mapping, dtype=None) -> dict[str, np.ndarray]:
    """Our scanned params tree -> HF state dict (numpy arrays), tied weights omitted as HF does."""
    out = {}
    for spec in tensor_specs(config):
        arr = np.asarray(tree_get(params, spec.path))
        if dtype is not None:
            arr = arr.astype(dtype)
        names = spec.hf_names(config.num_hidden_layers)
        for i, name in enumerate(names):
            out[name] = spec.to_hf(arr[i] if spec.stacked else arr)
    return out
