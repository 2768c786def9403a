"""`RunConfig`: one frozen dataclass for a training run, read from YAML.

Unknown keys are an error that lists them; `--set key=value` overrides (the value is parsed as
YAML, so `--set mesh=[2,4,1]` and `--set init_from=null` work). Everything is checked on
construction, before any device is touched.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any

import yaml

from jais2_jax.kernels import pallas_gpu
from jais2_jax.model.modules import LORA_TARGETS
from jais2_jax.model.options import ATTENTION_IMPLS, REMAT_POLICIES, as_dtype
from jais2_jax.parallel.sharding import parse_mesh
from jais2_jax.training.data import MAX_DATA_THREADS

SCHEDULES = ("cosine", "linear", "constant")
LORA_BASE_QUANTIZATIONS = (None, "int8", "nf4")
LORA_MU_DTYPES = (None, "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The run config's `lora:` block: low-rank adapters on a frozen base (`training/lora.py`).

    Same math as PEFT's LoRA: `y = W x + b + (alpha / rank) * B(A(dropout(x)))` on each projection
    named in `target_modules` (HF names). `base_quantization: int8` holds the frozen base's
    weight matrices as int8 + per-channel scales (QLoRA: projections, lm_head, embedding table);
    `nf4` holds the decoder projections as QLoRA's 4-bit NormalFloat (qwix's, blocks of 64 inputs)
    and the lm_head and embedding table as int8.
    `weight_decay` is the adapters' AdamW decay (the run's `weight_decay` is for full fine-tunes;
    a LoRA run has no other trained weights).
    `mu_dtype`: the dtype of AdamW's first moment (optax's `mu_dtype`; null: the adapters'
    `param_dtype`); bfloat16 halves it (0.4 GB on the 70B shape at rank 16). The second moment
    stays in `param_dtype`: bf16's 8-bit mantissa would drop its (1 - beta2) g^2 increments."""
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS
    base_quantization: str | None = None
    weight_decay: float = 0.0
    mu_dtype: str | None = None

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        for name, kind in (("rank", int), ("alpha", float), ("dropout", float),
                           ("weight_decay", float)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    kind is int and not isinstance(value, int)):
                wanted = "an integer" if kind is int else "a number"
                raise ValueError(f"lora.{name} must be {wanted}, got {value!r}")
            if kind is float:
                object.__setattr__(self, name, float(value))
                if not math.isfinite(float(value)):
                    raise ValueError(f"lora.{name} must be a finite number, got {value!r}")
        if self.rank <= 0:
            raise ValueError(f"lora.rank must be positive, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.weight_decay < 0:
            raise ValueError(f"lora.weight_decay must be >= 0, got {self.weight_decay}")
        targets = self.target_modules
        if not isinstance(targets, (list, tuple)) or not targets or not all(
                isinstance(t, str) for t in targets):
            raise ValueError(f"lora.target_modules must be a non-empty list of module names "
                             f"(from {list(LORA_TARGETS)}), got {targets!r}")
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"lora.target_modules: unknown module(s) {unknown}; Jais2's "
                             f"projections are {list(LORA_TARGETS)}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"lora.target_modules names a module twice: {list(targets)}")
        # canonical order, so that equal sets compare equal (resume checks)
        object.__setattr__(self, "target_modules", tuple(t for t in LORA_TARGETS if t in targets))
        if self.base_quantization not in LORA_BASE_QUANTIZATIONS:
            raise ValueError(f"lora.base_quantization {self.base_quantization!r}: choose null (the "
                             "base in the compute dtype), int8 or nf4 (QLoRA)")
        if self.mu_dtype not in LORA_MU_DTYPES:
            raise ValueError(f"lora.mu_dtype {self.mu_dtype!r}: choose null (the adapters' "
                             "param_dtype), float32 or bfloat16")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraConfig":
        if not isinstance(d, dict):
            raise ValueError(f"the lora block must be a mapping, got {d!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown keys in the lora block: {unknown} (known: {names})")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(d["target_modules"])
        return d


@dataclasses.dataclass(frozen=True)
class RunConfig:
    # --- what to train
    model: str  # preset name ("jais2-tiny") or a path to config.json / a checkpoint directory
    data: str  # token store written by `jais2 prepare-data`
    output_dir: str  # checkpoints, metrics.jsonl, tensorboard/ (resumes if checkpoints exist)
    init_from: str | None = None  # continued training: HF or Orbax checkpoint (load_checkpoint)
    # --- shapes
    seq_len: int = 2048
    batch_size: int = 8  # global sequences per optimizer step
    grad_accum_steps: int = 1  # the batch is split into this many micro-batches, scanned
    # --- optimizer and schedule
    total_steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine / linear)
    warmup_steps: int = 100
    schedule: str = "cosine"
    weight_decay: float = 0.1  # kernels and embeddings only, never norms or biases
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad_norm: float | None = 1.0
    z_loss: float = 0.0  # weight of mean(logsumexp^2); 1e-4 is usual when enabled
    loss_chunk: int = 512  # tokens of each sequence per chunk of the logits
    # False (default): the lm_head GEMM returns its logits in the compute dtype, as transformers
    # does under bf16 autocast (the reference the benchmarks compare with) and MaxText and Megatron
    # by default; the cross-entropy still runs in float32 on them, and the loss's passes over the
    # logits read half the bytes (see training.py). True: float32 logits from the GEMM (~2% slower
    # on the H100 2B step). With a float32 compute dtype the logits are float32 either way.
    logits_dot_in_fp32: bool = False
    # --- numerics and memory
    dtype: str = "bfloat16"  # compute
    param_dtype: str = "float32"
    remat_policy: str = "dots"
    attention_impl: str | None = None
    # LayerNorm, the loss's logsumexp and the MLP's bias + relu^2 backward: None picks the Pallas
    # kernels on GPU (each device's block under a mesh), XLA otherwise; "xla" or "pallas"
    # (layernorm.py, logsumexp.py, bias_relu2.py)
    kernels: str | None = None
    # False: the step runs the layers unrolled over a per-layer view of the (still stacked) params;
    # no stacked buffers of saved activations to fill and copy (faster on GPU), longer compiles
    scan_layers: bool = True
    # (data, fsdp, tensor) sizes with one -1 for "the rest", or a preset of sharding.make_mesh
    # ("fsdp", "dp", "tp", "fsdp+tp"); dcn_mesh: how many slices/hosts each axis spans (multi-slice)
    mesh: str | tuple[int, ...] = "fsdp"
    dcn_mesh: str | tuple[int, ...] | None = None
    # --- bookkeeping
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200  # 0: never
    eval_batches: int = 4
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    max_nonfinite_in_a_row: int = 5
    # lm-eval tasks on the current params (comma-separated, as `jais2 eval --tasks`), every
    # eval_tasks_every steps (0: with eval_every), each metric logged as "eval/TASK/METRIC"
    eval_tasks: str | None = None
    eval_tasks_every: int = 0
    eval_tasks_limit: int | None = None  # requests per task (None: all)
    eval_tasks_include_path: str | None = None  # folder of task YAMLs (besides configs/eval)
    # keep the checkpoint with the best "eval_loss" (lowest) or task metric "TASK/METRIC" (highest;
    # lowest for perplexities, losses and bits per byte) beside the latest `keep_checkpoints`; a
    # checkpoint is saved at every step that measures it
    keep_best: str | None = None
    peak_tflops_per_device: float | None = None  # for MFU; None: looked up from the device kind
    data_threads: int = 2  # loader threads, 1..MAX_DATA_THREADS (256; each prefetches 2 batches)
    # --- LoRA / QLoRA: train adapters on the frozen base `init_from` (None: full fine-tune)
    lora: LoraConfig | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name)))
        self._validate()

    def _validate(self):
        positive = ("seq_len", "batch_size", "grad_accum_steps", "total_steps", "loss_chunk",
                    "log_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                    "max_nonfinite_in_a_row")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 1 <= self.data_threads <= MAX_DATA_THREADS:
            raise ValueError(f"data_threads must be in [1, {MAX_DATA_THREADS}], got "
                             f"{self.data_threads}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps",
                     "clip_grad_norm", "z_loss", "peak_tflops_per_device"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        for name in ("warmup_steps", "eval_every", "weight_decay", "z_loss", "lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.eps <= 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.peak_tflops_per_device is not None and self.peak_tflops_per_device <= 0:
            raise ValueError(f"peak_tflops_per_device must be positive or null, got "
                             f"{self.peak_tflops_per_device}")
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds total_steps "
                             f"({self.total_steps})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r}: choose one of {SCHEDULES}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"batch_size ({self.batch_size}) is not divisible by "
                             f"grad_accum_steps ({self.grad_accum_steps})")
        if self.seq_len % min(self.loss_chunk, self.seq_len):
            raise ValueError(f"seq_len ({self.seq_len}) is not divisible by loss_chunk "
                             f"({self.loss_chunk})")
        for name in ("mesh", "dcn_mesh"):
            spec = getattr(self, name)
            if spec is not None and not isinstance(parse_mesh(spec), str) and len(spec) != 3:
                raise ValueError(f"{name} must have 3 sizes (data, fsdp, tensor), got {spec}")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be positive or null, got {self.clip_grad_norm}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r}: choose one of "
                             f"{sorted(REMAT_POLICIES)}")
        if self.attention_impl not in ATTENTION_IMPLS:  # as ModelOptions checks it, but up front
            raise ValueError(f"attention_impl {self.attention_impl!r}: choose one of "
                             f"{ATTENTION_IMPLS} (null: by backend)")
        if self.eval_tasks_every < 0:
            raise ValueError(f"eval_tasks_every must be >= 0, got {self.eval_tasks_every}")
        if self.eval_tasks_limit is not None and self.eval_tasks_limit <= 0:
            raise ValueError(f"eval_tasks_limit must be positive or null, got "
                             f"{self.eval_tasks_limit}")
        if self.eval_tasks is not None and not self.task_names:
            raise ValueError(f"eval_tasks names no task: {self.eval_tasks!r}")
        if self.keep_best is not None and self.keep_best != "eval_loss":
            task = self.keep_best.split("/")[0]
            if "/" not in self.keep_best or task not in self.task_names:
                raise ValueError(f"keep_best {self.keep_best!r}: choose 'eval_loss' or a metric "
                                 f"'TASK/METRIC' of a task in eval_tasks ({list(self.task_names)})")
        if self.keep_best == "eval_loss" and not self.eval_every:
            raise ValueError("keep_best: eval_loss needs eval_every > 0")
        if not 0 <= self.seed < 2 ** 63:  # a jax.random key's signed 64-bit seed
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        as_dtype(self.dtype), as_dtype(self.param_dtype)
        pallas_gpu.check(self.kernels, "kernels")

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in (self.eval_tasks or "").split(",") if t.strip())

    @property
    def tasks_every(self) -> int:
        return self.eval_tasks_every or self.eval_every

    @property
    def best_lower_is_better(self) -> bool:
        key = (self.keep_best or "").lower()
        return key == "eval_loss" or any(w in key for w in ("perplexity", "loss", "bits_per_byte"))

    # ------------------------------------------------------------------------------------------ i/o
    @classmethod
    def from_dict(cls, d: dict[str, Any], overrides: list[str] = ()) -> "RunConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a run config must be a mapping, got {type(d).__name__}")
        d = dict(d)
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--set wants key=value, got {item!r}")
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as e:  # one line: the override, then YAML's first complaint
                why = " ".join(str(getattr(e, "problem", None) or e).split())
                raise ValueError(f"--set {item!r}: the value is not valid YAML ({why})") from None
            key = key.strip()
            if key.startswith("lora."):  # --set lora.rank=16: one key of the lora block
                block = d.get("lora")
                d["lora"] = {**(block if isinstance(block, dict) else {}), key[5:]: parsed}
            else:
                d[key] = parsed
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown run config keys: {unknown} (known: {sorted(names)})")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in d)
        if missing:
            raise ValueError(f"run config is missing required keys: {missing}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: list[str] = ()) -> "RunConfig":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no run config at {path}")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"{path} is not valid YAML: {e}") from None
        return cls.from_dict(data or {}, overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("mesh", "dcn_mesh"):
            if isinstance(d[name], tuple):
                d[name] = list(d[name])
        if self.lora is not None:
            d["lora"] = self.lora.to_dict()
        return d

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def _coerce(name: str, value: Any) -> Any:
    """Checks `value` against the field's type annotation (ints pass as floats, lists as tuples)."""
    hint = typing.get_type_hints(RunConfig)[name]
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"{name} must not be null")
    for option in options:
        if option is LoraConfig:
            if isinstance(value, LoraConfig):
                return value
            if isinstance(value, dict):
                return LoraConfig.from_dict(value)
            raise ValueError(f"{name} must be a mapping (rank, alpha, ...) or null, got {value!r}")
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str):
            try:  # YAML 1.1 reads `3e-4` (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is tuple and isinstance(value, (list, tuple)) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ValueError(f"{name} must be {wanted}, got {value!r}")
