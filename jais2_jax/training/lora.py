"""LoRA / QLoRA fine-tuning: low-rank adapters trained on a frozen base (the run config's `lora:`).

The math is PEFT's: each targeted projection computes `W x + b + (alpha / rank) * B(A(drop(x)))`
(`model/linear.py`, the matmul seam). The train step (`step.make_train_step(..., frozen=True)`)
differentiates the loss with respect to the adapters only; the base is a separate,
non-differentiated argument of the jitted step (never donated, never in the optimizer, never in
a checkpoint), so no weight gradient of the base is computed: about 4 x params FLOPs a token
instead of 6.

Two trees, both in the stacked (`layers`) layout of `Jais2ForCausalLM`'s parameters:
- the base: every parameter except the adapters, in the compute dtype (`run.dtype`); with
  `lora.base_quantization: int8` (QLoRA) every weight matrix int8 + float32 scales: the decoder
  projections and an untied lm_head per output channel, the input embedding table per row
  (`quantize.quantize_embedding`). The fused loss makes each chunk's logits from the int8 lm_head
  a vocabulary tile at a time and the lookup gathers int8 rows, so neither is ever dequantized
  whole (on the 70B shape the two tables take 2.2 GB instead of 4.3 GB); norms and biases stay
  in the compute dtype. Loaded from `init_from`.
- the adapters: only `lora_a` [layers, in..., rank] and `lora_b` [layers, rank, out...] leaves of
  the targeted projections, in `param_dtype`, sharded by the rules table (`lora_rank` replicated).
  A is initialised as PEFT does (kaiming-uniform, a = sqrt(5)), B with zeros.

A LoRA run's checkpoints (`checkpoints/<step>/state`) hold the TrainState whose `params` are the
adapters, with their AdamW moments, the step and the RNG; `meta` holds the run config (with its
`lora` block and `init_from`, the base) and the model config. `read_run_adapter` reads one back.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jais2_jax.checkpoint import load_checkpoint
from jais2_jax.checkpoint.hub import resolve_checkpoint
from jais2_jax.model.config import Jais2Config
from jais2_jax.model.layout import unstack_layers
from jais2_jax.model.linear import LoraSpec
from jais2_jax.model.modules import Jais2ForCausalLM
from jais2_jax.model.options import ModelOptions, as_dtype
from jais2_jax.model.quantize import quantize_embedding
from jais2_jax.parallel import sharding
from jais2_jax.training.run_config import LoraConfig, RunConfig
from jais2_jax.training.step import init_state, make_optimizer, matmul_params

ADAPTER_LEAVES = ("lora_a", "lora_b")


# ------------------------------------------------------------------------------------ the blocks
def lora_spec(lora: LoraConfig) -> LoraSpec:
    return LoraSpec(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout)


def projection_sizes(config: Jais2Config) -> dict[str, tuple[int, int]]:
    """(in features, out features) of each projection an adapter may target (HF names)."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    h, kv = config.num_attention_heads, config.num_key_value_heads
    return {"q_proj": (d, h * hd), "k_proj": (d, kv * hd), "v_proj": (d, kv * hd),
            "o_proj": (h * hd, d), "up_proj": (d, f), "down_proj": (f, d)}


def check_lora(config: Jais2Config, lora: LoraConfig) -> None:
    """ValueError naming the projection when the rank exceeds its smaller side (PEFT would make
    an adapter no better than a full update there, and more expensive)."""
    sizes = projection_sizes(config)
    for name in lora.target_modules:
        n_in, n_out = sizes[name]
        if lora.rank > min(n_in, n_out):
            raise ValueError(f"lora.rank {lora.rank} is larger than {name} ({n_in} -> {n_out}): "
                             f"the rank must be at most {min(n_in, n_out)} for this model")


def lora_model(config: Jais2Config, run: RunConfig, options: ModelOptions) -> Jais2ForCausalLM:
    """The model a LoRA run trains: adapters on the targets, the base applied as its tree holds."""
    return Jais2ForCausalLM(config, dtype=as_dtype(run.dtype),
                            param_dtype=as_dtype(run.param_dtype), options=options,
                            lora=lora_spec(run.lora), lora_targets=run.lora.target_modules)


# -------------------------------------------------------------------------------- tree helpers
def adapter_subtree(tree):
    """Only the `lora_a` / `lora_b` entries of a nested dict (params, shardings, boxed abstract),
    empty branches dropped."""
    out = {}
    for key, value in tree.items():
        if key in ADAPTER_LEAVES:
            out[key] = value
        elif isinstance(value, dict):
            sub = adapter_subtree(value)
            if sub:
                out[key] = sub
    return out


def base_subtree(tree):
    """Everything but the adapters."""
    out = {}
    for key, value in tree.items():
        if key in ADAPTER_LEAVES:
            continue
        out[key] = base_subtree(value) if isinstance(value, dict) else value
    return out


def adapter_count(config: Jais2Config, lora: LoraConfig) -> int:
    """Number of adapter parameters (A and B of every targeted projection, all layers)."""
    sizes = projection_sizes(config)
    return config.num_hidden_layers * sum(lora.rank * (sizes[n][0] + sizes[n][1])
                                          for n in lora.target_modules)


# ----------------------------------------------------------------------- abstract trees, shardings
def base_model(config: Jais2Config, run: RunConfig) -> Jais2ForCausalLM:
    """The model whose parameter tree is the frozen base (QLoRA: int8 weight matrices)."""
    q = run.lora.base_quantization
    return Jais2ForCausalLM(config, param_dtype=as_dtype(run.dtype), quantization=q,
                            quantize_embedding=q is not None)


def abstract_base(config: Jais2Config, run: RunConfig, mesh=None):
    """(ShapeDtypeStructs, NamedShardings or None) of the frozen base on `mesh`."""
    model = base_model(config, run)
    shapes = sharding.unboxed_shapes(sharding.model_abstract_params(model))
    if mesh is None:
        return shapes, None
    return shapes, sharding.model_param_shardings(model, mesh)


def abstract_adapters(config: Jais2Config, run: RunConfig, mesh=None):
    """(ShapeDtypeStructs, NamedShardings or None) of the adapters (param_dtype) on `mesh`."""
    model = lora_model(config, run, ModelOptions())
    boxed = sharding.model_abstract_params(model)
    shapes = adapter_subtree(sharding.unboxed_shapes(boxed))
    if mesh is None:
        return shapes, None
    return shapes, adapter_subtree(sharding.model_param_shardings(model, mesh))


def init_adapters(model: Jais2ForCausalLM, key) -> dict:
    """Fresh adapters (A as PEFT initialises it, B zero), traced inside the caller's jit: the
    base's initialisers are dead code there and XLA drops them."""
    params = nn.meta.unbox(model.init(key, jnp.zeros((1, 1), jnp.int32))["params"])
    return adapter_subtree(params)


# ------------------------------------------------------------------------------------ the base
def load_base(run: RunConfig, config: Jais2Config, mesh, shardings=None) -> dict:
    """The frozen base from `run.init_from`: compute dtype, on `mesh` (each process reads its
    part); QLoRA: int8 projections and lm_head (quantized while reading), and the embedding table
    quantized per row once loaded."""
    q = run.lora.base_quantization
    loaded_config, params = load_checkpoint(resolve_checkpoint(run.init_from), dtype=as_dtype(run.dtype), mesh=mesh,
                                            quantize=q)
    if loaded_config != config:
        raise ValueError(f"init_from {run.init_from}: its model config differs from {run.model}")
    if q is not None:
        params = quantize_embedding(params, q)
    if shardings is not None:  # the program's shardings (the scales' included), as it compiled
        params = jax.device_put(params, shardings)
    return params


# ------------------------------------------------------------------------------ reading a run
@dataclasses.dataclass(frozen=True)
class RunAdapter:
    """A LoRA run's adapter, as `read_run_adapter` returns it.

    - `spec`: LoraSpec (rank, alpha, dropout); `target_modules`: HF names, e.g. ("q_proj", ...).
    - `base`: the run's `init_from` (the base checkpoint folder, as the run config names it);
      `base_quantization`: None or "int8" (the base the adapters were trained on).
    - `model_config`: the Jais2Config.
    - `adapters`: float32 numpy arrays in the PER-LAYER layout of our parameter tree
      (`model.layout.unstack_layers`), only `lora_a` / `lora_b` leaves:
          {"layers_<i>": {"self_attn": {"q_proj": {"lora_a": [D, r], "lora_b": [r, H, hd]},
                                        "k_proj": {"lora_a": [D, r], "lora_b": [r, KV, hd]},
                                        "v_proj": {"lora_a": [D, r], "lora_b": [r, KV, hd]},
                                        "o_proj": {"lora_a": [H, hd, r], "lora_b": [r, D]}},
                          "mlp": {"up_proj": {"lora_a": [D, r], "lora_b": [r, F]},
                                  "down_proj": {"lora_a": [F, r], "lora_b": [r, D]}}}}
      (only the targeted projections present). PEFT's lora_A.weight [r, in] is lora_a reshaped to
      [in, r] and transposed; lora_B.weight [out, r] is lora_b reshaped to [r, out] and transposed.
    - `step`: the checkpoint's step.
    """
    spec: LoraSpec
    target_modules: tuple[str, ...]
    base: str | None
    base_quantization: str | None
    model_config: Jais2Config
    adapters: dict
    step: int


def _checkpoint_dir(run_dir) -> str:
    return os.path.abspath(os.path.join(os.fspath(run_dir), "checkpoints"))


def _read_meta(manager, step) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def is_lora_run(run_dir) -> bool:
    """True when the run's latest checkpoint is of a LoRA run (its run config has `lora:`)."""
    directory = _checkpoint_dir(run_dir)
    if not os.path.isdir(directory):
        return False
    with ocp.CheckpointManager(directory, item_names=("state", "data", "meta")) as manager:
        step = manager.latest_step()
        if step is None:
            return False
        return _read_meta(manager, step).get("run", {}).get("lora") is not None


def read_run_adapter(run_dir, step: int | None = None) -> RunAdapter:
    """The adapter of a LoRA run's checkpoint `step` (default: the latest), on the host.

    FileNotFoundError when the run has no checkpoint; ValueError when it is not a LoRA run."""
    directory = _checkpoint_dir(run_dir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints in {run_dir}")
    with ocp.CheckpointManager(directory, item_names=("state", "data", "meta")) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoints in {run_dir}")
        if step not in manager.all_steps():
            raise FileNotFoundError(f"{run_dir} has no checkpoint of step {step} (it has "
                                    f"{sorted(manager.all_steps())})")
        meta = _read_meta(manager, step)
        if meta.get("run", {}).get("lora") is None:
            raise ValueError(f"{run_dir} is not a LoRA run (its run config has no lora block): "
                             "it holds full weights, not an adapter")
        config = Jais2Config.from_dict(meta["model_config"])
        run = RunConfig.from_dict(meta["run"])
        shapes, _ = abstract_adapters(config, run)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.eval_shape(lambda p: init_state(p, make_optimizer(run), run.seed), shapes)
        target = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"]
    adapters = jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=np.float32),
                                      unstack_layers(state.params))
    return RunAdapter(spec=lora_spec(run.lora), target_modules=run.lora.target_modules,
                      base=run.init_from, base_quantization=run.lora.base_quantization,
                      model_config=config, adapters=adapters, step=int(step))


def lora_flops_per_token(config: Jais2Config, seq_len: int, lora: LoraConfig) -> float:
    """Training FLOPs a token of a LoRA step: the base's matmuls forward and backward for the
    activations only (4 x params; no weight gradients), attention as in a full step (6 x its
    forward / 2), the adapters' own matmuls forward and backward (6 x their params)."""
    attention = (6 * config.num_hidden_layers * seq_len * config.num_attention_heads
                 * config.head_dim)
    return 4.0 * matmul_params(config) + attention + 6.0 * adapter_count(config, lora)
