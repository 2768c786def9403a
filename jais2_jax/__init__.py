"""jais2-jax: Jais2 in JAX/Flax, numerically identical to transformers' Jais2ForCausalLM.

The public API; each name lives in one layer package (README: "How the code is organised") and is
loaded on first use, so importing one layer (`jais2_jax.model`) loads nothing above it. Importing
does no work: no devices are touched, no distributed runtime is started, nothing is read from disk
or the network.
"""

import importlib

__version__ = "0.1.0"

_API = {
    "Jais2Config": "jais2_jax.model",
    "Jais2ForCausalLM": "jais2_jax.model",
    "KVCache": "jais2_jax.model",
    "LoraSpec": "jais2_jax.model",
    "ModelOptions": "jais2_jax.model",
    "init_cache": "jais2_jax.model",
    "init_params": "jais2_jax.model",
    "stack_layers": "jais2_jax.model",
    "unstack_layers": "jais2_jax.model",
    "quantize": "jais2_jax.model.quantize",
    "dequantize": "jais2_jax.model.quantize",
    "load_checkpoint": "jais2_jax.checkpoint",
    "generate": "jais2_jax.inference.generate",
    "Tokenizer": "jais2_jax.inference.tokenizer",
    "build_inference_program": "jais2_jax.inference.program",
    "build_train_program": "jais2_jax.training.program",
}

__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'jais2_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
