"""jais2-jax: Jais2 in JAX/Flax, numerically identical to transformers' Jais2ForCausalLM.

Importing this package does no work beyond importing JAX and Flax: no devices are touched, no
distributed runtime is started, nothing is read from disk or the network.
"""

from jais2_jax.model.cache import KVCache, init_cache
from jais2_jax.model.config import Jais2Config
# Imported here, not on first use: the function shares its name with its module, and a lazy import
# would leave the module bound to `jais2_jax.inference.generate` (so `from jais2_jax import generate` gave it).
from jais2_jax.inference.generate import generate
from jais2_jax.model.modules import Jais2ForCausalLM, init_params, stack_layers, unstack_layers

__version__ = "0.1.0"

__all__ = ["Jais2Config", "Jais2ForCausalLM", "KVCache", "init_cache", "init_params",
           "stack_layers", "unstack_layers", "load_checkpoint", "generate", "Tokenizer"]


def __getattr__(name):
    # Parts that pull in heavier dependencies (orbax, tokenizers) load on first use.
    if name == "load_checkpoint":
        from jais2_jax.checkpoint import load_checkpoint
        return load_checkpoint
    if name == "Tokenizer":
        from jais2_jax.inference.tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(f"module 'jais2_jax' has no attribute {name!r}")
