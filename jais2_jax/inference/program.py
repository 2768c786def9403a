"""From configs to a compiled inference program: model, mesh, shardings, jitted prefill/decode.

    program = build_inference_program(config, batch_size=8, max_length=2048, mesh=mesh)
    params = program.place(params)                  # onto the parameters' shardings
    cache = program.init_cache()                    # fixed shape, placed on the cache's shardings
    logits, cache = program.prefill(params, ids, mask, cache)
    logits, cache = program.decode_step(params, tokens, cache)

The one way the planner (AOT compiles for TPU topologies), the benchmarks and the serving and
evaluation layers get these steps; `abstract_params()` / `abstract_cache()` / `abstract_batch()`
give ShapeDtypeStructs with shardings, for `program.lower_prefill()` without any memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jais2_jax.inference.generate import decode_step, prefill
from jais2_jax.model.cache import KVCache, as_cache_dtype, init_cache
from jais2_jax.model.config import Jais2Config
from jais2_jax.model.modules import Jais2ForCausalLM
from jais2_jax.model.options import ModelOptions, as_dtype
from jais2_jax.parallel import sharding


@dataclasses.dataclass(frozen=True)
class InferenceProgram:
    """A model with its placement and jitted steps for `batch_size` rows of `max_length` slots."""
    config: Jais2Config
    model: Jais2ForCausalLM
    mesh: Any  # a jax Mesh (or AbstractMesh for AOT plans); None: this process's first device
    batch_size: int
    max_length: int
    cache_dtype: Any
    param_shardings: Any
    cache_shardings: KVCache

    @property
    def per_layer(self) -> bool:
        return not self.model.options.scan_layers

    def _context(self):
        return sharding.use_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def abstract_params(self):
        """ShapeDtypeStructs of the parameter tree (the model's layout), with their shardings."""
        abstract = sharding.unboxed_shapes(sharding.model_abstract_params(self.model))
        return _with(abstract, self.param_shardings)

    def abstract_cache(self) -> KVCache:
        abstract = jax.eval_shape(lambda: init_cache(
            self.config, self.batch_size, self.max_length, self.cache_dtype,
            per_layer=self.per_layer))
        return _with(abstract, self.cache_shardings)

    def abstract_batch(self, length: int):
        """(ids, mask) of `length` tokens a row and the decode step's tokens, as ShapeDtypeStructs."""
        rows = self._batch_sharding((self.batch_size, length))
        ids = jax.ShapeDtypeStruct((self.batch_size, length), jnp.int32, sharding=rows)
        tokens = jax.ShapeDtypeStruct((self.batch_size,), jnp.int32,
                                      sharding=self._batch_sharding((self.batch_size,)))
        return ids, tokens

    def _batch_sharding(self, shape):
        if self.mesh is None:
            return None
        if len(shape) == 1:
            return sharding.named_sharding(self.mesh, ("batch",))
        return sharding.batch_sharding(self.mesh, shape)

    def place(self, params):
        """Parameters onto their shardings (or this process's first device)."""
        return jax.device_put(params, self.param_shardings)

    def init_cache(self) -> KVCache:
        """An empty cache, created in place on its shardings."""
        make = lambda: init_cache(self.config, self.batch_size, self.max_length,  # noqa: E731
                                  self.cache_dtype, per_layer=self.per_layer)
        with self._context():
            return jax.jit(make, out_shardings=self.cache_shardings)()

    def prefill(self, params, input_ids, attention_mask, cache: KVCache):
        """Right-padded prompts into an empty cache -> (last-token logits [B, V], cache)."""
        with self._context():
            return prefill(self.model, params, input_ids, attention_mask, cache)

    def decode_step(self, params, tokens, cache: KVCache):
        """One token a row -> (logits [B, V], cache)."""
        with self._context():
            return decode_step(self.model, params, tokens, cache)

    def lower_prefill(self, length: int):
        """The prefill of `length` tokens a row, lowered from abstract inputs (no memory used)."""
        ids, _ = self.abstract_batch(length)
        params, cache = self.abstract_params(), self.abstract_cache()  # outside the mesh
        with self._context():
            return prefill.lower(self.model, params, ids, ids, cache)

    def lower_decode_step(self):
        _, tokens = self.abstract_batch(1)
        params, cache = self.abstract_params(), self.abstract_cache()  # outside the mesh
        with self._context():
            return decode_step.lower(self.model, params, tokens, cache)


def build_inference_program(config: Jais2Config, *, batch_size: int, max_length: int, mesh=None,
                            dtype="bfloat16", param_dtype=None, cache_dtype=None,
                            options: ModelOptions = ModelOptions(),
                            quantization: str | None = None) -> InferenceProgram:
    """Model, shardings and jitted steps for `batch_size` rows of up to `max_length` tokens.

    `param_dtype` and `cache_dtype` default to `dtype`. With `options.scan_layers=False` the
    parameters are the per-layer view (`unstack_layers`) and the cache is per layer too."""
    if batch_size <= 0 or max_length <= 0:
        raise ValueError(f"batch_size and max_length must be positive, got {batch_size}, "
                         f"{max_length}")
    if max_length > config.max_position_embeddings:
        raise ValueError(f"max_length {max_length} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    dtype = as_dtype(dtype)
    param_dtype = dtype if param_dtype is None else as_dtype(param_dtype)
    cache_dtype = dtype if cache_dtype is None else as_cache_dtype(cache_dtype)
    model = Jais2ForCausalLM(config, dtype=dtype, param_dtype=param_dtype, options=options,
                             quantization=quantization)
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = sharding.unboxed_shapes(sharding.model_abstract_params(model))
        params_sh = jax.tree_util.tree_map(lambda _: one, abstract)
        cache_sh = jax.tree_util.tree_map(lambda _: one, jax.eval_shape(lambda: init_cache(
            config, batch_size, max_length, cache_dtype, per_layer=not options.scan_layers)))
    else:
        params_sh = sharding.model_param_shardings(model, mesh)
        cache_sh = sharding.cache_shardings(config, mesh, batch_size, max_length,
                                            per_layer=not options.scan_layers,
                                            quantized=cache_dtype == jnp.int8)
    return InferenceProgram(config, model, mesh, batch_size, max_length, cache_dtype, params_sh,
                            cache_sh)


def _with(abstract, shardings):
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

