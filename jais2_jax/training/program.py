"""From configs to a compiled training program: model, optimizer, shardings, jitted steps.

    program = build_train_program(model_config, run_config, mesh)
    state = program.init_state(jax.random.key(0))          # created in its shards
    state, metrics = program.train_step(state, batch)       # batch: program.batch_sharding
    sums = program.eval_step(state.params, batch)

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

    def init_state(self, key) -> TrainState:
        """Random parameters and a fresh optimizer state, created directly in their shards."""
        def fresh(key):
            params = nn.meta.unbox(self.model.init(key, jnp.zeros((1, 1), jnp.int32))["params"])
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

    def lower_train_step(self):
        """The train step lowered from abstract inputs (no memory used): `.compile()` it."""
        state, batch = self.abstract_state(), self.abstract_batch()  # outside the mesh
        with sharding.use_mesh(self.mesh):
            return self.train_step.lower(state, batch)


def build_train_program(config: Jais2Config, run: RunConfig, mesh) -> TrainProgram:
    """Model, optimizer, shardings and the jitted train and eval steps of `run` on `mesh`.

    Only the run's shape and numerics matter (output_dir, data and init_from do not), so runs
    that differ in those share one compiled program."""
    return _build(config, run.replace(output_dir="", data="", init_from=None), mesh)


@functools.lru_cache(maxsize=4)
def _build(config: Jais2Config, run: RunConfig, mesh) -> TrainProgram:
    model = Jais2ForCausalLM(config, dtype=as_dtype(run.dtype),
                             param_dtype=as_dtype(run.param_dtype),
                             options=ModelOptions(remat_policy=run.remat_policy,
                                                  attention_impl=run.attention_impl,
                                                  kernels=run.kernels))
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


def clear_cache() -> None:
    """Forget the cached programs (benchmarks that build many shapes in one process)."""
    _build.cache_clear()
