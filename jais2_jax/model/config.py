"""`Jais2Config`: every field of transformers' Jais2Config, read from and written to HF `config.json`.

The config is a frozen dataclass validated on construction. Unknown keys are an error; the generic
bookkeeping keys that every HF config carries (`architectures`, `transformers_version`, `dtype`, ...)
are kept verbatim in `hf_metadata` so that a config.json read here is written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

# Activations transformers' ACT2FN knows and we implement (see model.ACTIVATIONS).
SUPPORTED_ACTIVATIONS = ("relu2", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu")

# rope_type -> keys it requires besides rope_theta (transformers' rope_config_validation).
ROPE_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}
ROPE_OPTIONAL_KEYS = {
    "default": (),
    "linear": (),
    "dynamic": (),
    "yarn": ("original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"),
    "longrope": ("original_max_position_embeddings", "attention_factor", "factor"),
    "llama3": ("original_max_position_embeddings",),
}
# Types whose pretraining length transformers fills in from max_position_embeddings when absent.
ROPE_TYPES_WITH_ORIGINAL_LENGTH = ("yarn", "longrope", "llama3")
DEFAULT_ROPE_THETA = 10000.0  # transformers >= 5 `default_theta`; always prefer config.json's value
# Upper bounds on the sizes, checked before anything is built from them (a config.json with
# `num_hidden_layers: 100000000` would otherwise build per-layer names until memory runs out).
# Far above any real model (Jais2 70B: 68 layers, 56 heads, hidden 7168, mlp 57344, vocab 150272,
# 8192 positions); a bound only stops a typo or a corrupt file.
MAX_SIZES = {
    "vocab_size": 1 << 24,  # 16.8M tokens
    "hidden_size": 1 << 18,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 1 << 14,
    "num_attention_heads": 1 << 14,
    "num_key_value_heads": 1 << 14,
    "head_dim": 1 << 14,
    "max_position_embeddings": 1 << 27,  # 134M positions
}
_FLOAT32_MAX = 3.4028234663852886e38

# Generic PreTrainedConfig keys: no effect on the model, preserved for an exact round trip.
HF_METADATA_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "name_or_path", "output_attentions", "output_hidden_states", "return_dict", "torchscript",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "auto_map", "_attn_implementation_autoset", "pretraining_tp", "num_labels",
})


def parse_json_object(text: str, where: str) -> dict:
    """The JSON object in `text`; a ValueError naming `where` (a file, or file:line) if it is not
    valid JSON or not an object."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, not {type(data).__name__}")
    return data


_ABSENT = "<absent>"  # a key config.json did not have


class _DefaultId(int):
    """transformers' default for a token id the config did not state: an int like any other, but
    not checked against vocab_size (the defaults are those of the released 150272-token vocabulary;
    transformers keeps them for any vocabulary too). Every id a config states is checked."""
    __slots__ = ()

    def __repr__(self):
        return int.__repr__(self)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    """A number (not a bool) that is neither NaN nor infinite."""
    return _number(value) and math.isfinite(value)


def _positive_finite(value) -> bool:
    return _finite(value) and value > 0


def read_json_object(path: str) -> dict:
    """The JSON object in the file `path` (config.json, tokenizer_config.json, ...)."""
    with open(path, encoding="utf-8") as f:
        return parse_json_object(f.read(), path)


@dataclasses.dataclass(frozen=True)
class Jais2Config:
    vocab_size: int = 150272
    hidden_size: int = 3328
    intermediate_size: int = 26624
    num_hidden_layers: int = 32
    num_attention_heads: int = 26
    num_key_value_heads: int | None = None  # None -> num_attention_heads
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    hidden_act: str = "relu2"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = _DefaultId(0)
    eos_token_id: int | tuple[int, ...] | None = _DefaultId(150024)
    tie_word_embeddings: bool = False
    attention_bias: bool = True
    attention_dropout: float = 0.0
    mlp_bias: bool = True
    rope_parameters: dict | None = None  # None -> {"rope_type": "default", "rope_theta": 10000.0}
    # Bookkeeping for the HF round trip; not part of the model.
    hf_metadata: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    # config.json spelled RoPE the legacy way (top-level rope_theta / rope_scaling): written back
    # so; its rope_scaling value as read (or _ABSENT) is kept to write it back unchanged
    legacy_rope_keys: bool = dataclasses.field(default=False, compare=False, repr=False)
    legacy_rope_scaling: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        if self.rope_parameters is not None and not isinstance(self.rope_parameters, dict):
            raise ValueError(f"rope_parameters must be an object, got {self.rope_parameters!r}")
        rope = dict(self.rope_parameters or {})
        rope.setdefault("rope_type", rope.get("type", "default"))
        rope.setdefault("rope_theta", DEFAULT_ROPE_THETA)
        set_("rope_parameters", rope)
        self._validate()
        if self.head_dim is None:
            set_("head_dim", self.hidden_size // self.num_attention_heads)

    # ----------------------------------------------------------------------------------- validation
    def _validate(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is not None and (not isinstance(self.head_dim, int)
                                          or isinstance(self.head_dim, bool) or self.head_dim <= 0):
            raise ValueError(f"head_dim must be a positive integer, got {self.head_dim!r}")
        for name, limit in MAX_SIZES.items():
            value = getattr(self, name)
            if value is not None and value > limit:
                raise ValueError(f"{name} {value} is beyond any real model (at most {limit}); "
                                 "is the config corrupt?")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); set head_dim explicitly")
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}"
                             + ("" if self.head_dim else " (hidden_size / num_attention_heads)"))
        for name in ("use_cache", "tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; "
                             f"choose one of {SUPPORTED_ACTIVATIONS}")
        if not (_number(self.layer_norm_eps) and self.layer_norm_eps > 0):
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        # null as transformers accepts it (no dropout: this implementation has none anyway)
        dropout = self.attention_dropout
        if dropout is not None and not (_number(dropout) and 0.0 <= dropout < 1.0):
            raise ValueError(f"attention_dropout must be in [0, 1), got {dropout!r}")
        if not (_number(self.initializer_range) and self.initializer_range >= 0):
            raise ValueError(f"initializer_range must be a number >= 0, got {self.initializer_range!r}")
        for name in ("pad_token_id", "bos_token_id"):
            self._check_token_id(name, getattr(self, name))
        eos = self.eos_token_id
        for tok in (eos if isinstance(eos, tuple) else (eos,)):
            self._check_token_id("eos_token_id", tok)
        self._validate_rope()

    def _check_token_id(self, name, value):
        if value is None:
            return
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer or null, got {value!r}")
        if value >= self.vocab_size and not isinstance(value, _DefaultId):
            raise ValueError(f"{name} {value} is outside the vocabulary: it must be below "
                             f"vocab_size ({self.vocab_size}), or null")

    def _validate_rope(self):
        rope = self.rope_parameters
        rope_type = rope["rope_type"]
        if rope_type not in ROPE_REQUIRED_KEYS:
            raise ValueError(f"rope_parameters.rope_type {rope_type!r} is not supported; "
                             f"choose one of {tuple(ROPE_REQUIRED_KEYS)}")
        theta = rope["rope_theta"]
        if not (_positive_finite(theta) and theta <= _FLOAT32_MAX):  # float32, as transformers
            raise ValueError(f"rope_parameters.rope_theta must be a positive number within "
                             f"float32 range, got {theta!r}")
        missing = [k for k in ROPE_REQUIRED_KEYS[rope_type] if rope.get(k) is None]
        if missing:
            raise ValueError(f"rope_parameters of rope_type {rope_type!r} needs {missing}")
        allowed = {"rope_type", "type", "rope_theta", "partial_rotary_factor",
                   *ROPE_REQUIRED_KEYS[rope_type], *ROPE_OPTIONAL_KEYS[rope_type]}
        unknown = sorted(set(rope) - allowed)
        if unknown:
            raise ValueError(f"rope_parameters has unknown keys for rope_type {rope_type!r}: {unknown}")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            # Jais2 rotates the whole head (transformers' apply_rotary_pos_emb has no partial path).
            raise ValueError("rope_parameters.partial_rotary_factor must be 1.0 for Jais2, got "
                             f"{rope['partial_rotary_factor']!r}")
        factor = rope.get("factor")
        if factor is not None and not _positive_finite(factor):
            raise ValueError(f"rope_parameters.factor must be a positive finite number, "
                             f"got {factor!r}")
        if rope_type in ("linear", "dynamic", "llama3") and factor < 1.0:
            raise ValueError(f"rope_parameters.factor must be >= 1 for {rope_type}, got {factor!r}")
        if rope_type == "longrope":
            half = (self.head_dim or self.hidden_size // self.num_attention_heads) // 2
            for key in ("short_factor", "long_factor"):
                value = rope[key]
                if not isinstance(value, (list, tuple)):
                    raise ValueError(f"rope_parameters.{key} must be a list of head_dim/2 = {half} "
                                     f"positive numbers, got {value!r}")
                if len(value) != half:
                    raise ValueError(f"rope_parameters.{key} must have head_dim/2 = {half} entries, "
                                     f"got {len(value)}")
                bad = [v for v in value if not _positive_finite(v)]
                if bad:
                    raise ValueError(f"rope_parameters.{key} must hold positive finite numbers, "
                                     f"got {bad[0]!r}")
        if rope_type == "llama3":
            for key in ("low_freq_factor", "high_freq_factor"):
                if not _positive_finite(rope[key]):
                    raise ValueError(f"rope_parameters.{key} must be a positive finite number, "
                                     f"got {rope[key]!r}")
            if rope["high_freq_factor"] <= rope["low_freq_factor"]:
                raise ValueError(f"rope_parameters.high_freq_factor ({rope['high_freq_factor']!r}) "
                                 f"must exceed low_freq_factor ({rope['low_freq_factor']!r})")
        for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            value = rope.get(key)
            if value is not None and not (_finite(value) and value >= 0):
                raise ValueError(f"rope_parameters.{key} must be a finite number >= 0 or null, "
                                 f"got {value!r}")
        if not isinstance(rope.get("truncate", True), bool):
            raise ValueError(f"rope_parameters.truncate must be true or false, "
                             f"got {rope['truncate']!r}")
        orig = rope.get("original_max_position_embeddings")
        if orig is not None and (not isinstance(orig, int) or isinstance(orig, bool) or orig <= 0):
            raise ValueError(f"rope_parameters.original_max_position_embeddings must be a positive "
                             f"integer, got {orig!r}")

    # ------------------------------------------------------------------------------ derived values
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else (eos if isinstance(eos, tuple) else (eos,))

    @property
    def rope_original_max_position_embeddings(self) -> int:
        return self.rope_parameters.get("original_max_position_embeddings",
                                        self.max_position_embeddings)

    def num_parameters(self) -> int:
        d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                           self.num_key_value_heads, self.head_dim)
        attn = d * hd * (2 * h + 2 * kv) + (hd * (h + 2 * kv) + d if self.attention_bias else 0)
        mlp = 2 * d * f + (f + d if self.mlp_bias else 0)
        layer = attn + mlp + 4 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embed + 2 * d

    def replace(self, **changes) -> "Jais2Config":
        return dataclasses.replace(self, **changes)

    def __hash__(self):  # over the compared fields only, as __eq__
        return hash(json.dumps([(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                                if f.compare], sort_keys=True, default=str))

    # --------------------------------------------------------------------------------- HF json i/o
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Jais2Config":
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        model_type = d.get("model_type", "jais2")
        if model_type != "jais2":
            raise ValueError(f"model_type is {model_type!r}, expected 'jais2'")
        metadata = {k: d.pop(k) for k in list(d) if k in HF_METADATA_KEYS}
        legacy = "rope_theta" in d or "rope_scaling" in d
        params = d.pop("rope_parameters", None)
        theta = d.pop("rope_theta", None)
        scaling = d.pop("rope_scaling", _ABSENT)
        for name, value in (("rope_parameters", params), ("rope_scaling", scaling)):
            if value not in (None, _ABSENT) and not isinstance(value, dict):
                raise ValueError(f"{name} must be an object or null, got {value!r}")
        # As transformers reads it: a legacy rope_scaling replaces rope_parameters; the top-level
        # rope_theta fills in a theta the chosen one lacks.
        rope = dict(scaling if scaling not in (None, _ABSENT, {}) else params or {})
        if theta is not None:
            rope.setdefault("rope_theta", theta)
        internal = {"hf_metadata", "legacy_rope_keys", "legacy_rope_scaling"}
        unknown = sorted(set(d) - ({f.name for f in dataclasses.fields(cls)} - internal))
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}")
        return cls(**d, rope_parameters=rope or None, hf_metadata=metadata, legacy_rope_keys=legacy,
                   legacy_rope_scaling=scaling)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("hf_metadata", "legacy_rope_keys", "legacy_rope_scaling",
                                 "rope_parameters")}
        if isinstance(out["eos_token_id"], tuple):
            out["eos_token_id"] = list(out["eos_token_id"])
        rope = dict(self.rope_parameters)
        if self.legacy_rope_keys:
            out["rope_theta"] = rope.pop("rope_theta")
            scaling = None if rope == {"rope_type": "default"} else rope
            read = self.legacy_rope_scaling  # as config.json had it, if it still says the same
            if read is _ABSENT or read is None:
                if scaling is not None or read is None:
                    out["rope_scaling"] = scaling
            else:
                same = dict(read)
                same.setdefault("rope_type", same.get("type", "default"))
                same.pop("rope_theta", None)
                out["rope_scaling"] = read if same == rope else scaling
        else:
            out["rope_parameters"] = rope
        out.update(self.hf_metadata)
        out.setdefault("model_type", "jais2")
        return dict(sorted(out.items()))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "Jais2Config":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_dict(read_json_object(path))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, directory: str | os.PathLike) -> str:
        """Writes `directory/config.json` atomically (temporary file, then rename)."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(os.fspath(directory), "config.json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        os.replace(tmp, path)
        return path


def load_model_config(spec: str) -> Jais2Config:
    """A preset name (configs/<name>.json) or a path to config.json / a checkpoint directory."""
    if os.path.exists(spec):
        return Jais2Config.from_json_file(spec)
    return preset(spec)


def preset(name: str) -> Jais2Config:
    """A config from `configs/<name>.json` (e.g. "jais2-8b", "jais2-70b", "jais2-tiny")."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    here = os.path.join(root, "configs")
    path = name if name.endswith(".json") else os.path.join(here, f"{name}.json")
    return Jais2Config.from_json_file(path)


def generation_eos_ids(folder) -> list[int]:
    """eos_token_id (an int or a list) of a checkpoint's generation_config.json, if any: what
    transformers' generate stops at besides config.json's."""
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return []
    eos = read_json_object(path).get("eos_token_id")
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError(f"{path}: eos_token_id must be an int or a list of ints, got {eos!r}")
    return ids
