"""PEFT LoRA adapter folders, both ways: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names a layer's adapter `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
([r, in], HF's layout) and `...lora_B.weight` ([out, r]); ours are `lora_a` [in..., r] and
`lora_b` [r, out...] beside the projection's kernel (`model/linear.py`), stacked on a leading
`layers` axis like every other parameter. The product is PEFT's: `W x + scale * B(A(x))` with
scale = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)).

What we read is checked against the base and refused by name where we would compute something
else than PEFT: DoRA, LoRA biases, `modules_to_save`, per-layer rank/alpha patterns,
`layers_to_transform`, a regular expression for `target_modules`, fan_in_fan_out, modules we do
not have, tensors of another shape (an adapter for another base). A `base_model_name_or_path`
that names another model is only warned about: the same weights live under many names (a hub id,
a local copy), and the shapes are checked strictly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Mapping

import numpy as np

from jais2_jax.checkpoint import hf_mapping
from jais2_jax.checkpoint.common import regular_file_exists
from jais2_jax.checkpoint.safetensors_io import read_header, read_rows, write_safetensors
from jais2_jax.model.config import Jais2Config, read_json_object
from jais2_jax.model.linear import LoraSpec
from jais2_jax.model.modules import LORA_TARGETS
from jais2_jax.model.quantize import contracted_dims
from jais2_jax.utils.fsutil import staged_output

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
TASK_TYPES = (None, "CAUSAL_LM")
_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
          "o_proj": "self_attn", "up_proj": "mlp", "down_proj": "mlp"}
_TENSOR = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])\.weight")

# adapter_config.json keys that change what the adapter computes, each with the values we take
# (what PEFT writes when the feature is off); any other value is refused by name.
_OFF = {
    "use_dora": (False, None), "lora_bias": (False, None), "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []), "layers_to_transform": (None, []),
    "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "exclude_modules": (None, [], ""),
    "target_parameters": (None, []), "layer_replication": (None, []),
    "trainable_token_indices": (None, {}, []), "use_qalora": (False, None),
    "alora_invocation_tokens": (None, []), "use_bdlora": (None, False),
}
# Keys that say how an adapter was made or saved, not what it computes.
_INFORMATIONAL = {
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias",
    "use_rslora", "base_model_name_or_path", "revision", "inference_mode", "init_lora_weights",
    "layers_pattern", "auto_mapping", "peft_version", "loftq_config", "megatron_config",
    "megatron_core", "eva_config", "corda_config", "qalora_group_size", "runtime_config",
    "lora_ga_config", "arrow_config", "kasa_config", "monteclora_config", "ensure_weight_tying",
}
_FEATURE = {"use_dora": "DoRA (use_dora)", "lora_bias": "LoRA biases (lora_bias)",
            "modules_to_save": "modules_to_save (fully trained copies of modules)",
            "layers_to_transform": "layers_to_transform (an adapter on some layers only)",
            "rank_pattern": "rank_pattern (per-module ranks)",
            "alpha_pattern": "alpha_pattern (per-module alphas)"}


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """A LoRA adapter's settings, as PEFT's LoraConfig holds them (the subset we support).

    `spec` is the `LoraSpec` a model that keeps the adapter apart needs:
    `Jais2ForCausalLM(config, lora=ac.spec, lora_targets=ac.target_modules)`."""
    rank: int
    alpha: float
    target_modules: tuple[str, ...] = LORA_TARGETS
    dropout: float = 0.0
    use_rslora: bool = False
    base_model_name_or_path: str | None = None

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def spec(self) -> LoraSpec:
        # LoraSpec scales by alpha / rank: rsLoRA's alpha / sqrt(r) is the same with alpha * sqrt(r).
        alpha = self.alpha * math.sqrt(self.rank) if self.use_rslora else self.alpha
        return LoraSpec(rank=self.rank, alpha=alpha, dropout=self.dropout)

    def to_peft_json(self) -> dict:
        """adapter_config.json as PEFT writes it (the keys that matter; PEFT fills the rest)."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank,
                "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": list(self.target_modules), "bias": "none",
                "use_rslora": self.use_rslora, "use_dora": False, "fan_in_fan_out": False,
                "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
                "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
                "inference_mode": True, "base_model_name_or_path": self.base_model_name_or_path,
                "revision": None}


def is_adapter_folder(path) -> bool:
    return os.path.isdir(path) and regular_file_exists(os.path.join(path, ADAPTER_CONFIG))


ADAPTER_FOLDER = ("a PEFT adapter folder (adapter_config.json)", is_adapter_folder)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_adapter_config(raw: Mapping, where: str) -> AdapterConfig:
    """adapter_config.json's object -> AdapterConfig; ValueError naming what is not supported."""
    def bad(why):
        return ValueError(f"{where}: {why}")
    if raw.get("peft_type") != "LORA":
        raise bad(f"peft_type {raw.get('peft_type')!r}: only LoRA adapters (peft_type 'LORA') "
                  "are supported")
    if raw.get("task_type") not in TASK_TYPES:
        raise bad(f"task_type {raw.get('task_type')!r}: only causal language modelling "
                  "('CAUSAL_LM' or null) is supported")
    r, alpha = raw.get("r"), raw.get("lora_alpha", 8)
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        raise bad(f"r (the rank) must be a positive integer, got {r!r}")
    if not _is_number(alpha):
        raise bad(f"lora_alpha must be a number, got {alpha!r}")
    dropout = raw.get("lora_dropout", 0.0)
    if not (_is_number(dropout) and 0 <= dropout < 1):
        raise bad(f"lora_dropout must be in [0, 1), got {dropout!r}")
    if raw.get("bias", "none") != "none":
        raise bad(f"bias {raw.get('bias')!r}: only 'none' is supported (trained biases are not "
                  "part of a LoRA adapter here)")
    rslora = raw.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise bad(f"use_rslora must be true or false, got {rslora!r}")
    for key, allowed in _OFF.items():
        if key in raw and not any(raw[key] is v if v is None or isinstance(v, bool) else
                                  (type(raw[key]) is type(v) and raw[key] == v) for v in allowed):
            raise bad(f"{_FEATURE.get(key, key)} = {json.dumps(raw[key])[:80]} is not supported")
    unknown = sorted(k for k in raw if k not in _OFF and k not in _INFORMATIONAL and raw[k])
    if unknown:
        raise bad(f"adapter_config.json keys {unknown} are not known here; an adapter using them "
                  "is not supported")
    targets = raw.get("target_modules")
    if targets == "all-linear":  # PEFT: every linear layer but the output one
        targets = list(LORA_TARGETS)
    if isinstance(targets, str):
        raise bad(f"target_modules is the regular expression {targets!r}; only a list of module "
                  f"names (among {list(LORA_TARGETS)}) or 'all-linear' is supported")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise bad(f"target_modules must be a non-empty list of module names, got {targets!r}")
    names = [t.rsplit(".", 1)[-1] for t in targets]  # PEFT matches a suffix: "self_attn.q_proj"
    unknown = sorted({t for t, n in zip(targets, names) if n not in LORA_TARGETS
                      or ("." in t and not f"{_BLOCK[n]}.{n}".endswith(t))})
    if unknown:
        raise bad(f"target_modules {unknown}: this model has only {list(LORA_TARGETS)}")
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(rank=r, alpha=alpha, dropout=float(dropout), use_rslora=rslora,
                         target_modules=tuple(n for n in LORA_TARGETS if n in names),
                         base_model_name_or_path=base if isinstance(base, str) else None)


def read_adapter_config(folder) -> AdapterConfig:
    """The adapter_config.json of a PEFT adapter folder, checked (see `parse_adapter_config`)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"adapter {folder} is not a folder")
    path = os.path.join(folder, ADAPTER_CONFIG)
    if not regular_file_exists(path):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {folder}: not a PEFT adapter folder")
    return parse_adapter_config(read_json_object(path), path)


def module_path(name: str) -> tuple[str, ...]:
    """Our tree's path of a projection's parameters in the stacked layers."""
    return ("layers", _BLOCK[name], name)


def _kernel_specs(config: Jais2Config) -> dict[str, hf_mapping.TensorSpec]:
    return {s.path[-2]: s for s in hf_mapping.tensor_specs(config)
            if s.path[-1] == "kernel" and len(s.path) == 4 and s.path[-2] in _BLOCK}


def _split(name: str, spec: hf_mapping.TensorSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n_in = contracted_dims(name)
    return spec.our_shape[:n_in], spec.our_shape[n_in:]


def read_adapter(folder, config: Jais2Config, *, base=None) -> tuple[AdapterConfig, dict]:
    """(AdapterConfig, adapter tree) of a PEFT LoRA folder for a base of `config`. The tree holds
    float32 `lora_a` [layers, in..., r] and `lora_b` [layers, r, out...] at each targeted
    projection's path (`layers/self_attn/q_proj/...`). `base` (the base's folder) is compared with
    the adapter's base_model_name_or_path: a warning if it names another model."""
    folder = os.fspath(folder)
    ac = read_adapter_config(folder)
    path = os.path.join(folder, ADAPTER_WEIGHTS)
    if not regular_file_exists(path):
        if os.path.lexists(os.path.join(folder, PICKLED_WEIGHTS)):
            raise ValueError(f"{folder} holds {PICKLED_WEIGHTS} (a pickle, which is never loaded "
                             f"here); save the adapter with safe_serialization to get {ADAPTER_WEIGHTS}")
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {folder}")
    if base is not None:
        _check_base_name(ac, base)
    tensors = read_header(path)
    n, r = config.num_hidden_layers, ac.rank
    specs = _kernel_specs(config)
    found: dict[tuple[str, int, str], np.ndarray] = {}
    problems = []
    for tname in sorted(tensors):
        m = _TENSOR.fullmatch(tname)
        if m is None or _BLOCK.get(m.group(3)) != m.group(2):
            problems.append(f"tensor {tname} is not a LoRA weight of a projection this model has")
            continue
        layer, proj, ab = int(m.group(1)), m.group(3), m.group(4)
        if proj not in ac.target_modules:
            problems.append(f"tensor {tname}: {proj} is not in target_modules "
                            f"{list(ac.target_modules)}")
            continue
        if layer >= n:
            problems.append(f"tensor {tname}: layer {layer}, but the base has {n} layers "
                            "(an adapter for another base?)")
            continue
        out_dim, in_dim = specs[proj].hf_shape
        want = (r, in_dim) if ab == "A" else (out_dim, r)
        t = tensors[tname]
        if t.shape != want:
            problems.append(f"tensor {tname} has shape {list(t.shape)}, but r={r} and the base's "
                            f"config imply {list(want)} (an adapter for another base?)")
            continue
        found[(proj, layer, ab)] = read_rows(t, 0, t.shape[0]).astype(np.float32)
    missing = [f"model.layers.{i}.{_BLOCK[p]}.{p}.lora_{ab}" for p in ac.target_modules
               for i in range(n) for ab in "AB" if (p, i, ab) not in found]
    if missing:
        problems.append(f"missing {len(missing)} tensors: {missing[:4]}"
                        + (" ..." if len(missing) > 4 else ""))
    if problems:
        raise ValueError(f"{path} does not fit the base: " + "; ".join(problems[:6])
                         + (f"; and {len(problems) - 6} more" if len(problems) > 6 else ""))
    tree: dict = {}
    for proj in ac.target_modules:
        in_shape, out_shape = _split(proj, specs[proj])
        a = np.stack([found[(proj, i, "A")].T.reshape(in_shape + (r,)) for i in range(n)])
        b = np.stack([found[(proj, i, "B")].T.reshape((r,) + out_shape) for i in range(n)])
        hf_mapping.tree_set(tree, module_path(proj) + ("lora_a",), a)
        hf_mapping.tree_set(tree, module_path(proj) + ("lora_b",), b)
    return ac, tree


def _check_base_name(ac: AdapterConfig, base) -> None:
    name = ac.base_model_name_or_path
    if not name:
        return
    base = os.path.abspath(os.fspath(base))
    if os.path.isdir(name) and os.path.realpath(name) == os.path.realpath(base):
        return
    last = name.rstrip("/").rsplit("/", 1)[-1]
    if last == os.path.basename(base.rstrip("/")):
        return
    warnings.warn(f"the adapter's base_model_name_or_path is {name!r}, but it is applied to "
                  f"{base}; its shapes fit, but check that it was trained on these weights",
                  stacklevel=3)


def adapter_delta(adapter: Mapping, name: str, box: tuple[slice, ...] | None = None,
                  scale: float = 1.0) -> np.ndarray:
    """scale * A . B for the projection `name` as a float32 array in the layout of its stacked
    kernel [layers, in..., out...], or of the `box` of it."""
    node = hf_mapping.tree_get(adapter, module_path(name))
    a, b = node["lora_a"], node["lora_b"]  # [L, *in, r], [L, r, *out]
    n_in = contracted_dims(name)
    if box is not None:
        a = a[box[:1 + n_in]]
        b = b[(box[0], slice(None)) + tuple(box[1 + n_in:])]
    lead, r = a.shape[0], a.shape[-1]
    in_shape, out_shape = a.shape[1:-1], b.shape[2:]
    d = np.matmul(a.reshape(lead, -1, r).astype(np.float32),
                  b.reshape(lead, r, -1).astype(np.float32))
    return (d * np.float32(scale)).reshape((lead,) + in_shape + out_shape)


def merge_adapter(params: Mapping, adapter: Mapping, scale: float) -> dict:
    """Our (stacked, in-memory, dense) params with the adapter merged into the kernels:
    W + scale * A . B computed in float32, cast back to W's dtype."""
    import jax
    out = jax.tree_util.tree_map(lambda x: x, dict(params))  # new dicts, same leaves
    for name in _BLOCK:
        path = module_path(name)
        try:
            hf_mapping.tree_get(adapter, path)
        except KeyError:
            continue
        kernel = np.asarray(hf_mapping.tree_get(out, path + ("kernel",)))
        merged = kernel.astype(np.float32) + adapter_delta(adapter, name, scale=scale)
        hf_mapping.tree_set(out, path + ("kernel",), merged.astype(kernel.dtype))
    return out


def stacked_adapter(adapters: Mapping) -> dict:
    """An adapter tree in the stacked layout (`layers/...`), from either layout: per-layer
    (`layers_0`, `layers_1`, ...) trees are stacked on a leading axis."""
    if "layers" in adapters:
        return dict(adapters)
    names = sorted((k for k in adapters if re.fullmatch(r"layers_\d+", k)), key=lambda k: int(k[7:]))
    if not names or [int(k[7:]) for k in names] != list(range(len(names))):
        raise ValueError(f"an adapter tree holds `layers` or layers_0..N-1, got {sorted(adapters)}")
    import jax
    layers = jax.tree_util.tree_map(lambda *a: np.stack([np.asarray(x) for x in a]),
                                    *[adapters[k] for k in names])
    return {"layers": layers}


def save_adapter(folder, ac: AdapterConfig, adapters: Mapping, config: Jais2Config, *,
                 force: bool = False) -> None:
    """A PEFT adapter folder from our adapter tree (stacked or per-layer layout, `lora_a` /
    `lora_b` leaves at the targeted projections), written beside `folder` and renamed into place;
    `force` replaces only an adapter folder (or an empty one). Tensors in float32, as PEFT saves."""
    adapters = stacked_adapter(adapters)
    specs = _kernel_specs(config)
    n, r = config.num_hidden_layers, ac.rank
    entries, arrays = [], []
    for proj in ac.target_modules:
        try:
            node = hf_mapping.tree_get(adapters, module_path(proj))
        except KeyError:
            raise ValueError(f"the adapter tree has no {proj} adapter, but target_modules names "
                             "it") from None
        in_shape, out_shape = _split(proj, specs[proj])
        a, b = np.asarray(node["lora_a"]), np.asarray(node["lora_b"])
        if a.shape != (n,) + in_shape + (r,) or b.shape != (n, r) + out_shape:
            raise ValueError(f"{proj}: lora_a {a.shape} / lora_b {b.shape} do not fit rank {r} and "
                             f"the config ({(n,) + in_shape + (r,)} / {(n, r) + out_shape})")
        for i in range(n):
            stem = f"base_model.model.model.layers.{i}.{_BLOCK[proj]}.{proj}"
            for suffix, x in (("lora_A", a[i].reshape(-1, r).T), ("lora_B", b[i].reshape(r, -1).T)):
                x = np.ascontiguousarray(x, dtype=np.float32)
                entries.append((f"{stem}.{suffix}.weight", x.shape, x.dtype))
                arrays.append(x)
    extra = sorted(set(_BLOCK) - set(ac.target_modules))
    for proj in extra:
        try:
            hf_mapping.tree_get(adapters, module_path(proj))
        except KeyError:
            continue
        raise ValueError(f"the adapter tree holds a {proj} adapter, but target_modules "
                         f"{list(ac.target_modules)} does not name it")
    with staged_output(folder, force, kind=ADAPTER_FOLDER) as tmp:
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(ac.to_peft_json(), f, indent=2)
            f.write("\n")
        write_safetensors(os.path.join(tmp, ADAPTER_WEIGHTS), entries, iter(arrays),
                          lambda _: None)
