"""Probe (not kept): a decode projection as one Pallas (Triton) kernel vs the model's XLA path.

The kernel below, `fused_linear`, does y = act(LayerNorm(x) W + b) (+ residual) in one program per
block of output columns: the LayerNorm's statistics of the whole row (float32, two-pass) in a
prologue, each x chunk normalised as it is multiplied (one row: broadcast multiply and sum; 16 or
more rows: a Triton dot), the bias / relu^2 / residual in the epilogue with the model's roundings,
and optionally split-K (float32 partial sums, the epilogue then in XLA). The idea was to replace
XLA's ~14 small kernels a decode layer (LayerNorm passes, bias + activation, residual adds) with
the four GEMVs themselves. Measured on the H100 (sixth session, `benchmarks/RESULTS.md`) it is
slower than XLA's LayerNorm + cuBLAS/Triton GEMV + epilogue kernels at 1, 16 and 64 rows: Triton's
one-row loop streams the weights at <= 1.8 TB/s where cuBLAS reads them at ~2.96, so it was not
wired into the model.

Part 1 sweeps tiles per projection and row count (each time: 8 weight copies in one jitted call,
so nothing is served from L2) and checks each result against XLA's; part 2 times a 32-layer chain
of the four projections (no attention), XLA vs the fused kernels with the best tiles of part 1.

  python benchmarks/probe_decode_linear.py [--rows 1,16,64] [--limit 10] [--verbose]
  python benchmarks/probe_decode_linear.py --read-only --limit 48   # next step, not yet run
"""

import argparse
import dataclasses
import functools
import itertools

from probe_common import BW, bench
from probe_decode_common import (DT, EPS, GPU, PROJ, D, F, epilogue, layer_with, make, sweep,
                                 time_chains, xla_layer)

import jax
import jax.numpy as jnp


# ---------------------------------------------------------------------- the kernel
Array = jax.Array
MAX_ROWS = 128
ACTS = (None, "relu2")


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_n: int = 64  # output columns a program
    block_k: int = 128  # K a loop step
    unroll: int = 2  # K steps a loop iteration (unrolled)
    split_k: int = 1  # programs along K
    warps: int = 4
    stages: int = 1
    # one row: accumulate the [block_k, block_n] products and sum them at the end ("tile"), or
    # sum each step's products into [block_n] ("row": fewer registers, a reduction a step)
    acc: str = "tile"


def default_tiles(m: int, k: int, n: int) -> Tiles:
    """A first guess of tiles for an [m, k] x [k, n] projection (the sweep tries others)."""
    block_n = _divisor(n, 64)
    split = 1
    while n // block_n * split < 128 and _divisor(k // split, 128) >= 64 and split < 8:
        split *= 2
    block_k = _divisor(k // split, 128)
    unroll = 2 if (k // split // block_k) % 2 == 0 else 1
    return Tiles(block_n=block_n, block_k=block_k, unroll=unroll, split_k=split, warps=4,
                 stages=1 if m == 1 else 3)


def _divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n."""
    return min(n & -n, cap)


def fits(x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> bool:
    """The kernel takes this projection: few rows, K and N with power-of-two blocks of >= 16."""
    m, k = x_shape
    return m <= MAX_ROWS and _divisor(k, 128) >= 16 and _divisor(w_shape[1], 64) >= 16


def fused_linear(x: Array, w: Array, bias: Array | None = None, *, norm=None,
                 act: str | None = None, residual: Array | None = None,
                 tiles: Tiles | None = None) -> Array:
    """act(LayerNorm(x) @ w + bias) + residual in x's dtype; x [M, K], w [K, N] (x's dtype),
    bias [N], residual [M, N]; norm: (scale [K], shift [K], eps) or None."""
    if act not in ACTS:
        raise ValueError(f"fused_linear act {act!r}: choose one of {ACTS}")
    m, k = x.shape
    if w.shape[0] != k:
        raise ValueError(f"fused_linear: x {x.shape} and w {w.shape} do not contract")
    if not fits(x.shape, w.shape):
        raise ValueError(f"fused_linear takes at most {MAX_ROWS} rows and K, N with power-of-two "
                         f"blocks of at least 16; got x {x.shape}, w {w.shape}")
    n = w.shape[1]
    t = tiles or default_tiles(m, k, n)
    mp = 1 if m == 1 else max(16, 1 << (m - 1).bit_length())
    if mp != m:
        x = jnp.pad(x, ((0, mp - m), (0, 0)))
        residual = None if residual is None else jnp.pad(residual, ((0, mp - m), (0, 0)))
    w = w.astype(x.dtype)
    split = t.split_k
    fused_epilogue = split == 1
    args = [x, w]
    names = ["x", "w"]
    if bias is not None and fused_epilogue:
        args.append(bias), names.append("bias")
    eps = None
    if norm is not None:
        scale, shift, eps = norm
        args += [scale, shift]
        names += ["scale", "shift"]
    if residual is not None and fused_epilogue:
        args.append(residual), names.append("residual")
    y = _call(tuple(names), mp, k, n, x.dtype, t, None if eps is None else float(eps),
              act if fused_epilogue else None)(*args)
    if not fused_epilogue:  # float32 partial sums [split, mp, n]: the epilogue in XLA
        y = epilogue(jnp.sum(y, axis=0), bias, act, residual, x.dtype)
    return y[:m] if mp != m else y


@functools.lru_cache(maxsize=None)
def _call(names, mp, k, n, dtype, t: Tiles, eps, act):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt
    kc = k // t.split_k
    if kc % (t.block_k * t.unroll) or n % t.block_n:
        raise ValueError(f"tiles {t} do not divide K {k} / N {n}")
    whole = lambda shape: pl.BlockSpec(shape, lambda j, s: (0,) * len(shape))
    rows = (k,) if mp == 1 else (mp, k)
    specs = {"x": whole(rows),
             "w": pl.BlockSpec((kc, t.block_n), lambda j, s: (s, j)),
             "bias": pl.BlockSpec((t.block_n,), lambda j, s: (j,)),
             "scale": whole((k,)), "shift": whole((k,)),
             "residual": (pl.BlockSpec((t.block_n,), lambda j, s: (j,)) if mp == 1 else
                          pl.BlockSpec((mp, t.block_n), lambda j, s: (0, j)))}
    if t.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((n,) if mp == 1 else (mp, n), dtype)
        out_spec = specs["residual"]
    else:
        out_shape = jax.ShapeDtypeStruct((t.split_k, mp, n), jnp.float32)
        out_spec = pl.BlockSpec((1, mp, t.block_n), lambda j, s: (s, 0, j))
    kernel = functools.partial(_kernel, names=names, mp=mp, k=k, kc=kc, t=t, eps=eps, act=act,
                               dtype=dtype)
    call = pl.pallas_call(kernel, grid=(n // t.block_n, t.split_k),
                          in_specs=[specs[name] for name in names], out_specs=out_spec,
                          out_shape=out_shape, interpret=jax.default_backend() != "gpu",
                          compiler_params=plt.CompilerParams(num_warps=t.warps,
                                                             num_stages=t.stages))
    if mp == 1:  # the one-row kernel works on vectors
        def one_row(x, *rest):
            res = call(x.reshape(k), *[r.reshape(-1) if name == "residual" else r
                                       for name, r in zip(names[1:], rest)])
            return res.reshape(1, n) if t.split_k == 1 else res
        return one_row
    return call


def _kernel(*refs, names, mp, k, kc, t: Tiles, eps, act, dtype):
    from jax.experimental import pallas as pl
    ref = dict(zip(names, refs))
    out_ref = refs[-1]
    x_ref = ref["x"]
    s = pl.program_id(1)
    f32 = jnp.float32

    def x_chunk(start, size):  # [size] or [mp, size] float32
        return (x_ref[pl.ds(start, size)] if mp == 1 else x_ref[:, pl.ds(start, size)]).astype(f32)

    def row_stat(v):  # sum over the last axis, kept as [1] / [mp, 1] for broadcasting
        return jnp.sum(v, axis=-1, keepdims=True)

    if eps is not None:
        # the whole row's statistics, two-pass, from static chunks (independent loads)
        cs = _divisor(k, 512)
        chunks = range(k // cs)
        mean = sum(row_stat(x_chunk(i * cs, cs)) for i in chunks) / k
        var = sum(row_stat(jnp.square(x_chunk(i * cs, cs) - mean)) for i in chunks) / k
        rstd = jax.lax.rsqrt(var + eps)

    def lhs(start):  # the (normalised) x chunk at absolute K offset `start`, in x's dtype
        v = x_chunk(start, t.block_k)
        if eps is not None:
            cols = pl.ds(start, t.block_k)
            v = (v - mean) * rstd * ref["scale"][cols].astype(f32) + ref["shift"][cols].astype(f32)
        return v.astype(dtype)

    def step(i, acc):  # K chunk i of this program's part
        w = ref["w"][pl.ds(i * t.block_k, t.block_k), :]
        xs = lhs(s * kc + i * t.block_k)
        if mp == 1:
            prod = xs.astype(f32)[:, None] * w.astype(f32)
            return acc + (jnp.sum(prod, axis=0) if t.acc == "row" else prod)
        return acc + jnp.dot(xs, w.astype(dtype), preferred_element_type=f32)

    def body(j, acc):
        for u in range(t.unroll):
            acc = step(j * t.unroll + u, acc)
        return acc

    shape = ((t.block_n,) if t.acc == "row" else (t.block_k, t.block_n)) if mp == 1 else (mp, t.block_n)
    acc = jax.lax.fori_loop(0, kc // t.block_k // t.unroll, body, jnp.zeros(shape, f32))
    if mp == 1 and t.acc == "tile":
        acc = jnp.sum(acc, axis=0)
    if t.split_k > 1:
        out_ref[...] = acc.reshape(out_ref.shape)
        return
    bias = ref["bias"][...] if "bias" in ref else None
    if bias is not None and mp > 1:
        bias = bias[None, :]
    residual = ref["residual"][...] if "residual" in ref else None
    out_ref[...] = epilogue(acc, bias, act, residual, dtype)


# ---------------------------------------------------------------------- the probe
def candidates(m, k, n, quick):
    out = [default_tiles(m, k, n)]
    if quick:
        return out
    splits = (1,) if n >= 8192 else (1, 2, 4, 8)
    for bn, bk, unroll, split, warps, acc in itertools.product(
            (16, 32, 64, 128), (64, 128, 256, 512), (1, 2, 4), splits, (2, 4, 8), ("tile", "row")):
        if m > 1 and (bn < 32 or acc == "row" or warps == 2 or bk > 256):
            continue
        if bk * unroll > (1024 if m == 1 else 512) or m == 1 and acc == "tile" and bk * bn > 16384:
            continue
        if (k // split) % (bk * unroll) or n // bn * split < 96 or n // bn * split > 2048:
            continue
        out.append(Tiles(bn, bk, unroll, split, warps, 1 if m == 1 else 3, acc))
    return out


def sample(cands, limit):
    """At most `limit` candidates, spread over the list (the default first)."""
    if len(cands) <= limit:
        return cands
    step = len(cands) / (limit - 1)
    return [cands[0]] + [cands[1 + int(i * step) % (len(cands) - 1)] for i in range(limit - 1)]


def part1(rows, quick, limit, verbose, only):
    best = {}
    print(f"{'proj':>5}{'M':>4}{'xla us':>9}{'ours us':>9}{'floor':>7}  best tiles (of n tried), err")
    for name, m in itertools.product(PROJ, rows):
        if only and name not in only:
            continue
        k, n = PROJ[name][:2]
        copies = 8
        x, ws, kw = make(name, copies, 7, rows=m)

        def call(x, w, t, norm=None, **kw):
            return fused_linear(x, w, tiles=t, norm=None if norm is None else (*norm, EPS), **kw)
        t_xla, results = sweep(x, ws, kw, sample(candidates(m, k, n, quick), limit), call,
                               verbose=verbose, tag=f"{name} M={m} ")
        default_us = {r[1]: r[0] for r in results}
        us, t, err = results[0]
        best[name, m] = t
        floor = 2 * k * n / BW * 1e6
        print(f"{name:>5}{m:>4}{t_xla:>9.1f}{us:>9.1f}{floor:>7.1f}  {t} ({len(results)}), "
              f"{err:.1e}; default tiles {default_us.get(default_tiles(m, k, n), float('nan')):.1f}",
              flush=True)
        del ws
    return best


def part2(rows, best):
    for m in rows:
        x = jax.random.normal(jax.random.key(5), (m, D)).astype(DT)

        def proj(name, x, w, bias, norm=None, act=None, residual=None, m=m):
            return fused_linear(x, w, bias, norm=None if norm is None else (*norm, EPS), act=act,
                                residual=residual, tiles=best.get((name, m)))
        time_chains(x, {"xla": (xla_layer, lambda p: p), "fused": (layer_with(proj), lambda p: p)},
                    label=f"M={m} ")


def read_only(limit):
    """How fast a Pallas (Triton) program streams a weight at all: column sums of the up
    projection's [K, N] weight (each program its block of columns, a loop over K), against XLA's
    jnp.sum over the same array. The ceiling any Pallas GEMV of this layout could reach."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt
    k, n = D, F
    w = (0.02 * jax.random.normal(jax.random.key(3), (k, n))).astype(DT)
    floor = k * n * 2 / BW * 1e6
    t_xla = bench(jax.jit(lambda w: jnp.sum(w.astype(jnp.float32), axis=0)), w) * 1e6
    print(f"read-only {k} x {n}: XLA column sums {t_xla:.1f} us, floor {floor:.1f} us")

    def kernel(w_ref, o_ref, *, bk, unroll):
        def body(i, acc):
            for u in range(unroll):
                acc = acc + w_ref[pl.ds((i * unroll + u) * bk, bk), :].astype(jnp.float32)
            return acc
        acc = jax.lax.fori_loop(0, k // bk // unroll, body,
                                jnp.zeros((bk, o_ref.shape[0]), jnp.float32))
        o_ref[...] = jnp.sum(acc, axis=0)

    results = []
    for bn, bk, unroll, warps, stages in itertools.product((32, 64, 128), (32, 64, 128), (1, 2),
                                                           (4, 8), (1, 3)):
        if k % (bk * unroll) or bn * bk > 8192:
            continue
        f = jax.jit(pl.pallas_call(
            functools.partial(kernel, bk=bk, unroll=unroll), grid=(n // bn,),
            in_specs=[pl.BlockSpec((k, bn), lambda j: (0, j))],
            out_specs=pl.BlockSpec((bn,), lambda j: (j,)),
            out_shape=jax.ShapeDtypeStruct((n,), jnp.float32), interpret=not GPU,
            compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages)))
        got = f(w)
        want = jnp.sum(w.astype(jnp.float32), axis=0)
        assert float(jnp.max(jnp.abs(got - want))) <= 1e-3 * float(jnp.max(jnp.abs(want))) + 1e-3
        results.append((bench(f, w) * 1e6, (bn, bk, unroll, warps, stages)))
        if len(results) >= limit:
            break
    for us, cfg in sorted(results)[:5]:
        print(f"  pallas (block_n, block_k, unroll, warps, stages) = {cfg}: {us:.1f} us "
              f"({k * n * 2 / us / 1e6:.2f} TB/s)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,16,64")
    ap.add_argument("--quick", action="store_true", help="default tiles only")
    ap.add_argument("--limit", type=int, default=14, help="tile settings tried per case")
    ap.add_argument("--no-chain", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="every tile setting's time")
    ap.add_argument("--only", default="", help="projections to sweep (default all)")
    ap.add_argument("--read-only", action="store_true",
                    help="only the weight-streaming ceiling of a Pallas program vs XLA")
    a = ap.parse_args()
    rows = tuple(int(r) for r in a.rows.split(","))
    if a.read_only:
        print(jax.devices()[0].device_kind, jax.__version__, flush=True)
        read_only(a.limit)
        raise SystemExit(0)
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    best = part1(rows, a.quick, a.limit, a.verbose, a.only.split(",") if a.only else ())
    if not a.no_chain:
        part2(rows, best)
