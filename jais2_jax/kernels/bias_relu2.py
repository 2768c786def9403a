"""relu(y + b)^2, the Jais2 MLP's bias and activation, with a backward pass that makes dy and db
in one read: XLA, or a Pallas (Triton) kernel on GPU.

Forward: z = y + b (float32, rounded to y's dtype), relu(z)^2, tagged "mlp_act" as `model.relu2`
does (the remat policies save it). Backward from the output alone: dz = 2 sqrt(out) g in y's dtype
(`model.relu2`'s rule, rounded where it rounds), db = the float32 sum of dz over the rows (the
kernel sums the rounded dz, as torch does; XLA under jit may sum them before rounding, its excess
precision). XLA makes both in one fusion at ~72% of the bandwidth on the H100 2B step; the kernel
walks row blocks of `_ROWS` rows by `_COLS` columns, keeping the column sums in registers.

`impl` as in `pallas_gpu.py` (None: the kernel on GPU when each device's width has a power-of-two
block of at least 128 that divides it; "pallas" takes any width). The kernel is not differentiable
(no second order through it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jais2_jax.kernels import pallas_gpu

Array = jax.Array
# rows a program, rows a loop step, widest column block, warps (`probe_bias_relu2.py --sweep`)
_ROWS, _SUB, _COLS, _WARPS = 64, 2, 2048, 4


def bias_relu2(y: Array, bias: Array, impl: str | None = None) -> Array:
    """relu(y + bias)^2 in y's dtype; y [..., F], bias [F] (any float dtype)."""
    pallas_gpu.check(impl, "bias_relu2")
    return _bias_relu2(y, bias, impl)


def _forward(y, bias):
    z = (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(y.dtype)
    return jnp.square(jax.nn.relu(z))


def slope(out: Array) -> Array:
    """d relu(z)^2 / dz = 2 sqrt(out), in out's dtype; a double where keeps its own derivative
    finite at out = 0 (second order through the XLA path)."""
    positive = out > 0
    return jnp.where(positive, 2 * jnp.sqrt(jnp.where(positive, out, 1)), 0).astype(out.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bias_relu2(y, bias, impl):
    return _forward(y, bias)


def _fwd(y, bias, impl):
    out = checkpoint_name(_forward(y, bias), "mlp_act")
    return out, (out, bias)


def _bwd(impl, res, g):
    out, bias = res
    spec = pallas_gpu.activation_spec(out.shape, "mlp")  # [batch, length, mlp]
    width = pallas_gpu.local_width(spec, out.shape[-1])  # each device's columns
    cols = min(width & -width, _COLS)
    if pallas_gpu.resolve(impl, cols >= 128) == "xla":
        dz = (slope(out) * g.astype(out.dtype)).astype(out.dtype)
        db = jnp.sum(dz.astype(jnp.float32), axis=tuple(range(dz.ndim - 1)))
        return dz, db.astype(bias.dtype)

    # (asked for by name, any width: blocks of its largest power-of-two divisor)
    def local(out, g):  # each device its rows and columns; db: its partial sums [1, columns]
        dz, db = _pallas_bwd(out.reshape(-1, width), g.reshape(-1, width).astype(out.dtype), cols)
        return dz.reshape(out.shape), db[None]

    part = pallas_gpu.partial_spec(spec)
    dz, db = pallas_gpu.per_shard(local, spec, (spec, spec), (spec, part))(out, g)
    return dz, jnp.sum(db, axis=0).astype(bias.dtype)


_bias_relu2.defvjp(_fwd, _bwd)



def _bwd_kernel(out_ref, g_ref, dz_ref, db_ref, *, sub):
    from jax.experimental import pallas as pl

    def step(j, acc):
        rows = pl.ds(j * sub, sub)
        out = out_ref[rows, :]
        # the XLA rule's roundings: the slope in out's dtype, then the product
        s = (2 * jnp.sqrt(out.astype(jnp.float32))).astype(out.dtype).astype(jnp.float32)
        dz = (s * g_ref[rows, :].astype(jnp.float32)).astype(dz_ref.dtype)
        dz_ref[rows, :] = dz
        return acc + jnp.sum(dz.astype(jnp.float32), axis=0)

    acc = jax.lax.fori_loop(0, out_ref.shape[0] // sub, step,
                            jnp.zeros((out_ref.shape[1],), jnp.float32))
    db_ref[...] = acc[None, :]


def _pallas_bwd(out, g, cols):
    from jax.experimental import pallas as pl
    n, f = out.shape
    r = min(n & -n, _ROWS)
    sub = min(r, _SUB)
    p = n // r
    block = pl.BlockSpec((r, cols), lambda i, j: (i, j))
    dz, partial = pallas_gpu.call(
        functools.partial(_bwd_kernel, sub=sub), grid=(p, f // cols),
        in_specs=[block, block], out_specs=[block, pl.BlockSpec((1, cols), lambda i, j: (i, j))],
        out_shape=[jax.ShapeDtypeStruct((n, f), out.dtype),
                   jax.ShapeDtypeStruct((p, f), jnp.float32)], warps=_WARPS)(out, g)
    return dz, jnp.sum(partial, axis=0)
