"""Pallas kernels (GPU via Triton) with their XLA fallbacks: LayerNorm, the MLP's bias + relu^2
backward, and the loss's logsumexp. Each takes `impl` None (by backend), "xla" or "pallas"."""

from jais2_jax.kernels.bias_relu2 import bias_relu2
from jais2_jax.kernels.layernorm import layer_norm
from jais2_jax.kernels.logsumexp import logsumexp

__all__ = ["bias_relu2", "layer_norm", "logsumexp"]
