"""Inference: prefill and decode steps over the KV cache, generate, sampling, the tokenizer."""

from jais2_jax.inference.generate import decode_step, generate, prefill
from jais2_jax.inference.sampling import Sampler

__all__ = ["Sampler", "decode_step", "generate", "prefill"]
