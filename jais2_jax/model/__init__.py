"""The model: HF config, linen modules, RoPE, attention dispatch, the KV cache, the matmul seam."""

from jais2_jax.model.cache import KVCache, init_cache
from jais2_jax.model.config import Jais2Config
from jais2_jax.model.layout import init_params, stack_layers, unstack_layers
from jais2_jax.model.linear import LoraSpec
from jais2_jax.model.modules import Jais2ForCausalLM
from jais2_jax.model.options import ModelOptions, as_dtype

__all__ = ["Jais2Config", "Jais2ForCausalLM", "KVCache", "LoraSpec", "ModelOptions", "as_dtype", "init_cache", "init_params",
           "stack_layers", "unstack_layers"]
