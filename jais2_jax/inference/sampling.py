"""Next-token choice from logits: greedy, or sampling with temperature, top-k and top-p.

The filters follow transformers' logits warpers in their order (temperature, then top-k, then
top-p), so `filter_logits` keeps exactly the tokens `generate(do_sample=True)` would. Randomness
comes only from the explicit `jax.random` key: the same key gives the same tokens.

The temperature divides the logits, as in transformers. A positive temperature below
`MIN_TEMPERATURE` (1e-5) is greedy: there the scaled logits put all the probability on the best
token except between logits closer than about 1e-4, and far below it (1e-45) the division
overflows float32, which would turn every logit into +-inf and the draw into noise (transformers
then fails on NaN probabilities).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# Temperatures in (0, MIN_TEMPERATURE) sample as temperature 0 (greedy); see the module docstring.
MIN_TEMPERATURE = 1e-5


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How to pick a token. temperature 0 means greedy (top_k and top_p are then unused), and so
    does a positive temperature below MIN_TEMPERATURE (stored as 0)."""
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if (not isinstance(t, (int, float, np.number)) or isinstance(t, (bool, np.bool_))
                or not (t >= 0 and math.isfinite(t))):
            raise ValueError(f"temperature must be >= 0 and finite (0 = greedy), got {t!r}")
        if k is not None and (not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0):
            raise ValueError(f"top_k must be a positive integer or None, got {k!r}")
        if p is not None and (not isinstance(p, (int, float, np.number)) or isinstance(p, bool)
                              or not 0.0 < p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        # Plain Python numbers: the sampler is a static argument of the compiled loop.
        object.__setattr__(self, "temperature", float(t) if t >= MIN_TEMPERATURE else 0.0)
        object.__setattr__(self, "top_k", None if k is None else int(k))
        object.__setattr__(self, "top_p", None if p is None else float(p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: Array, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> Array:
    """Scaled logits with the tokens outside top-k / top-p set to -inf.

    logits: [batch, vocab] float32. Ties at a cut-off are kept, as in transformers. A temperature
    below MIN_TEMPERATURE keeps only the best token(s), as greedy does.
    """
    if temperature < MIN_TEMPERATURE:  # logits / temperature would overflow float32
        x = logits.astype(jnp.float32)
        return jnp.where(x < x.max(axis=-1, keepdims=True), -jnp.inf, 0.0)
    x = logits.astype(jnp.float32) / temperature  # [B, V]
    vocab = x.shape[-1]
    k = vocab if top_k is None else min(top_k, vocab)
    if k == vocab and (top_p is None or top_p >= 1.0):
        return x
    # Sorted descending: a full sort only when top-p has to see the whole vocabulary.
    top, _ = jax.lax.top_k(x, k)  # [B, k]
    cutoff = top[:, -1:]  # [B, 1]: the smallest logit top-k keeps
    if top_p is not None and top_p < 1.0:
        probs = jax.nn.softmax(top, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
        keep = mass_before < top_p  # the best token always stays (mass 0 < top_p)
        n_keep = keep.sum(axis=-1, keepdims=True)  # [B, 1]
        cutoff = jnp.take_along_axis(top, n_keep - 1, axis=-1)
    return jnp.where(x < cutoff, -jnp.inf, x)


def sample(logits: Array, key: Array | None, sampler: Sampler) -> Array:
    """logits [batch, vocab] -> token ids [batch] int32."""
    if sampler.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = filter_logits(logits, sampler.temperature, sampler.top_k, sampler.top_p)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
