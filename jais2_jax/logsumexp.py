"""logsumexp over the last axis in float32: XLA, or one Pallas (Triton) pass on GPU.

XLA makes a logsumexp two passes over the logits (the max, then the sum of exponentials); for the
loss's [rows, 150k] logits each pass reads gigabytes. The Pallas kernel reads them once: each
program walks its rows' vocabulary in blocks, keeping a running max and a sum rescaled to it
(online softmax). Not differentiable: the fused loss makes its own gradient (training.py).

`impl=None` picks Pallas on GPU when the width has a power-of-two block of at least 128 that
divides it (150272 = 587 x 256) and no multi-device mesh is in use, XLA otherwise;
`impl="pallas"` off GPU runs the kernel in Pallas' interpreter (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jais2_jax.sharding import pallas_by_default

Array = jax.Array
IMPLS = (None, "xla", "pallas")
# rows a program, widest vocabulary block, warps a program (`benchmarks/probe_logsumexp.py --sweep`)
_ROWS, _MAX_BLOCK, _WARPS = 8, 2048, 8
_MIN_BLOCK = 128


def logsumexp(x: Array, *, impl: str | None = None) -> Array:
    """log(sum(exp(x), -1)) in float32, x of any float dtype [..., V]."""
    if impl not in IMPLS:
        raise ValueError(f"logsumexp impl {impl!r}: choose one of {IMPLS}")
    block = min(x.shape[-1] & -x.shape[-1], _MAX_BLOCK)
    if impl is None:
        impl = "pallas" if pallas_by_default() and block >= _MIN_BLOCK else "xla"
    if impl == "xla":
        x32 = x.astype(jnp.float32)
        top = jax.lax.stop_gradient(jnp.max(x32, axis=-1, keepdims=True))
        return jnp.log(jnp.sum(jnp.exp(x32 - top), axis=-1)) + top[..., 0]
    if block < _MIN_BLOCK:
        raise ValueError(f"the Pallas logsumexp wants a width divisible by {_MIN_BLOCK}, "
                         f"got {x.shape[-1]}")
    rows = x.reshape(-1, x.shape[-1])
    return _pallas(rows, block, jax.default_backend() != "gpu").reshape(x.shape[:-1])



def _kernel(x_ref, out_ref, *, block):
    from jax.experimental import pallas as pl
    r = x_ref.shape[0]

    def step(j, carry):
        m, s = carry
        x = x_ref[:, pl.ds(j * block, block)].astype(jnp.float32)  # [R, block]
        m_new = jnp.maximum(m, jnp.max(x, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new[:, None]), axis=1)
        return m_new, s

    init = (jnp.full((r,), -jnp.inf, jnp.float32), jnp.zeros((r,), jnp.float32))
    m, s = jax.lax.fori_loop(0, x_ref.shape[1] // block, step, init)
    out_ref[...] = m + jnp.log(s)


def _pallas(x, block, interpret):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt
    n, v = x.shape
    r = min(n & -n, _ROWS)
    return pl.pallas_call(
        functools.partial(_kernel, block=block), grid=(n // r,),
        in_specs=[pl.BlockSpec((r, v), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((r,), lambda i: (i,)),
        out_shape=jax.ShapeDtypeStruct((n,), jnp.float32), interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=_WARPS, num_stages=1))(x)
