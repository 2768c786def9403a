"""From configs to a compiled training program: model, optimizer, shardings, jitted steps.

    program = build_train_program(model_config, run_config, mesh)
    state = program.init_state(jax.random.key(0))          # created in its shards
    state, metrics = program.train_step(state, batch)       # batch: program.batch_sharding
    sums = program.eval_step(state.params, batch)

A LoRA run (`run.lora`, `training/lora.py`) builds the same program around the adapters: the
state's params are the adapters alone, and the steps take the frozen base as a last argument,
`program.train_step(state, batch, base)` and `program.eval_step(state.params, batch, base)`
(`program.lora` is True; `program.abstract_base` / `base_shardings` describe the base).

The one way the trainer, the TPU plans (`lower_train_step()` from abstract inputs) and the
benchmarks build a train step; cached, so a process running several runs of one shape (a notebook,
a resumed run, the tests) compiles the steps once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jais2_jax.model.config import Jais2Config
from jais2_jax.model.modules import Jais2ForCausalLM
from jais2_jax.model.options import ModelOptions, as_dtype
from jais2_jax.parallel import sharding
from jais2_jax.training import lora as lora_lib
from jais2_jax.training.run_config import RunConfig
from jais2_jax.training.step import (
    TrainState,
    init_state,
    jit_train_step,
    make_eval_step,
    make_optimizer,
    make_train_step,
    state_shardings,
)

# The arrays of a training batch ([batch, seq] each) and their dtypes.
BATCH_DTYPES = {"input_ids": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32,
                "positions": jnp.int32, "loss_mask": jnp.float32}


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    config: Jais2Config
    run: RunConfig
    mesh: Any
    model: Jais2ForCausalLM
    optimizer: Any
    abstract_params: Any  # ShapeDtypeStructs of the (unboxed) parameter tree
    param_shardings: Any
    state_shardings: TrainState
    batch_sharding: Any
    train_step: Callable  # jitted (state, batch) -> (state, metrics); the state is donated
    eval_step: Callable  # jitted (params, batch) -> {"ce_sum", "targets"}
    lora: bool = False  # the steps take the frozen base as a last argument
    abstract_base: Any = None  # LoRA: ShapeDtypeStructs of the frozen base
    base_shardings: Any = None  # LoRA: its NamedShardings

    def init_state(self, key) -> TrainState:
        """Random parameters (LoRA: fresh adapters, A as PEFT initialises it, B zero) and a
        fresh optimizer state, created directly in their shards."""
        def fresh(key):
            if self.lora:
                params = lora_lib.init_adapters(self.model, key)
            else:
                params = nn.meta.unbox(
                    self.model.init(key, jnp.zeros((1, 1), jnp.int32))["params"])
            return init_state(params, self.optimizer, self.run.seed)
        with sharding.use_mesh(self.mesh):
            return jax.jit(fresh, out_shardings=self.state_shardings)(key)

    def state_from_params(self, params) -> TrainState:
        """A fresh optimizer state around given parameters (donated: no second copy)."""
        with sharding.use_mesh(self.mesh):
            return jax.jit(lambda p: init_state(p, self.optimizer, self.run.seed),
                           out_shardings=self.state_shardings, donate_argnums=0)(params)

    def abstract_state(self) -> TrainState:
        state = jax.eval_shape(lambda p: init_state(p, self.optimizer, self.run.seed),
                               self.abstract_params)
        return jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
            self.state_shardings)

    def abstract_batch(self) -> dict:
        shape = (self.run.batch_size, self.run.seq_len)
        return {k: jax.ShapeDtypeStruct(shape, dt, sharding=self.batch_sharding)
                for k, dt in BATCH_DTYPES.items()}

    def abstract_base_sharded(self):
        """LoRA: the frozen base's ShapeDtypeStructs with their shardings."""
        return jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_base,
            self.base_shardings)

    def lower_train_step(self):
        """The train step lowered from abstract inputs (no memory used): `.compile()` it."""
        state, batch = self.abstract_state(), self.abstract_batch()  # outside the mesh
        extra = (self.abstract_base_sharded(),) if self.lora else ()
        with sharding.use_mesh(self.mesh):
            return self.train_step.lower(state, batch, *extra)


def build_train_program(config: Jais2Config, run: RunConfig, mesh) -> TrainProgram:
    """Model, optimizer, shardings and the jitted train and eval steps of `run` on `mesh`.

    Only the run's shape and numerics matter (output_dir, data and init_from do not), so runs
    that differ in those share one compiled program."""
    return _build(config, run.replace(output_dir="", data="", init_from=None), mesh)


@functools.lru_cache(maxsize=4)
def _build(config: Jais2Config, run: RunConfig, mesh) -> TrainProgram:
    options = ModelOptions(remat_policy=run.remat_policy, attention_impl=run.attention_impl,
                           kernels=run.kernels)
    if run.lora is not None:
        return _build_lora(config, run, mesh, options)
    model = Jais2ForCausalLM(config, dtype=as_dtype(run.dtype),
                             param_dtype=as_dtype(run.param_dtype), options=options)
    optimizer = make_optimizer(run)
    params_sh = sharding.param_shardings(config, mesh)
    abstract_params = nn.meta.unbox(
        sharding.abstract_params(config, param_dtype=as_dtype(run.param_dtype)))
    state_sh = state_shardings(optimizer, params_sh, abstract_params)
    batch_sh = sharding.batch_sharding(mesh, (run.batch_size, run.seq_len))
    step = jit_train_step(make_train_step(model, optimizer, run), state_sh, batch_sh)
    evaluate = jax.jit(make_eval_step(model, run), in_shardings=(params_sh, batch_sh))
    return TrainProgram(config, run, mesh, model, optimizer, abstract_params, params_sh, state_sh,
                        batch_sh, step, evaluate)


def _build_lora(config: Jais2Config, run: RunConfig, mesh, options) -> TrainProgram:
    """The LoRA program: state over the adapters, the frozen base a (sharded) step argument."""
    lora_lib.check_lora(config, run.lora)
    model = lora_lib.lora_model(config, run, options)
    optimizer = make_optimizer(run)
    abstract_adapters, adapter_sh = lora_lib.abstract_adapters(config, run, mesh)
    abstract_base, base_sh = lora_lib.abstract_base(config, run, mesh)
    state_sh = state_shardings(optimizer, adapter_sh, abstract_adapters)
    batch_sh = sharding.batch_sharding(mesh, (run.batch_size, run.seq_len))
    step = jit_train_step(make_train_step(model, optimizer, run, frozen=True), state_sh, batch_sh,
                          base_sh)
    evaluate = jax.jit(make_eval_step(model, run), in_shardings=(adapter_sh, batch_sh, base_sh))
    return TrainProgram(config, run, mesh, model, optimizer, abstract_adapters, adapter_sh,
                        state_sh, batch_sh, step, evaluate, lora=True,
                        abstract_base=abstract_base, base_shardings=base_sh)


def clear_cache() -> None:
    """Forget the cached programs (benchmarks that build many shapes in one process)."""
    _build.cache_clear()
