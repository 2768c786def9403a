"""logsumexp over the last axis in float32: XLA, or one Pallas (Triton) pass on GPU.

XLA makes a logsumexp two passes over the logits (the max, then the sum of exponentials); for the
loss's [rows, 150k] logits each pass reads gigabytes. The Pallas kernel reads them once: each
program walks its rows' vocabulary in blocks, keeping a running max and a sum rescaled to it
(online softmax). Not differentiable: the fused loss makes its own gradient (training.py).

The kernel wants a width with a power-of-two block of at least 128 that divides it (150272 =
587 x 256) and whole rows on each device; `impl` as in `pallas_gpu.py` (None: Pallas on GPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jais2_jax.kernels import pallas_gpu

Array = jax.Array
# rows a program, widest vocabulary block, warps a program (`benchmarks/probe_logsumexp.py --sweep`)
_ROWS, _MAX_BLOCK, _WARPS = 8, 2048, 8
_MIN_BLOCK = 128


def logsumexp(x: Array, *, impl: str | None = None) -> Array:
    """log(sum(exp(x), -1)) in float32, x of any float dtype [..., V]."""
    pallas_gpu.check(impl, "logsumexp")
    block = min(x.shape[-1] & -x.shape[-1], _MAX_BLOCK)
    spec = pallas_gpu.activation_spec(x.shape, "vocab")  # [batch, length, vocab] logits
    whole_rows = pallas_gpu.local_width(spec, x.shape[-1]) == x.shape[-1]
    if pallas_gpu.resolve(impl, block >= _MIN_BLOCK and whole_rows) == "xla":
        x32 = x.astype(jnp.float32)
        top = jax.lax.stop_gradient(jnp.max(x32, axis=-1, keepdims=True))
        return jnp.log(jnp.sum(jnp.exp(x32 - top), axis=-1)) + top[..., 0]
    if block < _MIN_BLOCK:
        raise ValueError(f"the Pallas logsumexp wants a width divisible by {_MIN_BLOCK}, "
                         f"got {x.shape[-1]}")
    if not whole_rows:
        raise ValueError("the Pallas logsumexp wants whole rows on each device; the mesh rules "
                         f"split the vocabulary ({spec[-1]!r})")

    def local(x):  # each device its own rows
        return _pallas(x.reshape(-1, x.shape[-1]), block).reshape(x.shape[:-1])
    return pallas_gpu.per_shard(local, spec, (spec,), pallas_gpu.rows_spec(spec))(x)



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


def _pallas(x, block):
    from jax.experimental import pallas as pl
    n, v = x.shape
    r = min(n & -n, _ROWS)
    return pallas_gpu.call(
        functools.partial(_kernel, block=block), grid=(n // r,),
        in_specs=[pl.BlockSpec((r, v), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((r,), lambda i: (i,)),
        out_shape=jax.ShapeDtypeStruct((n,), jnp.float32), warps=_WARPS)(x)
