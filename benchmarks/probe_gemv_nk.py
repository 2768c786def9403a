"""Probe (not kept): one-row decode projections as one Pallas (Triton) kernel over [N, K] weights.

`probe_decode_linear.py` fused the LayerNorm prologue and the bias / relu^2 / residual epilogue into
a Pallas GEMV over the model's [K, N] weights, and it streamed them at <= 1.8 TB/s (cuBLAS: 2.96).
`probe_gemv.py` had seen the same with XLA: column reductions over [K, N] were slow, row reductions
over [N, K] as fast as cuBLAS. This probe tries the kernel over [N, K] weights (an inference layout,
like the fused q/k/v): each program owns `block_n` output rows and walks K in contiguous
[block_n, block_k] tiles, the row's LayerNorm statistics first. Batch 1 only. On the H100 (seventh
session, `benchmarks/RESULTS.md`) it was no faster than XLA's path (32-layer chain 7.26 vs 6.91 ms).

Part 1: each projection alone (8 weight copies a call, so nothing is served from L2), XLA's path
(LayerNorm kernels + cuBLAS over [K, N] + epilogue kernels) against the kernel over a sweep of tiles,
and the result checked against XLA's. Part 2: a 32-layer chain of the four projections.

  python benchmarks/probe_gemv_nk.py [--limit 12] [--only qkv,up] [--no-chain]
"""

import argparse
import functools
import itertools

from probe_common import BW, bench
from probe_decode_common import (DT, EPS, GPU, PROJ, epilogue, f32, layer_with, make, round_to,
                                 sweep, time_chains, xla_layer)

import jax
import jax.numpy as jnp


def gemv_nk(x, wt, bias=None, *, norm=None, act=None, residual=None, tiles=(8, 256, 1, 4)):
    """act(LayerNorm(x) @ wt.T + bias) + residual; x [K], wt [N, K], bias / residual [N]."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt
    (n, k), (bn, bk, unroll, warps) = wt.shape, tiles
    if n % bn or k % (bk * unroll):
        raise ValueError(f"tiles {tiles} do not divide N {n} / K {k}")
    names, args = ["x", "w"], [x, wt]
    if norm is not None:
        names += ["scale", "shift"]
        args += list(norm)
    for name, a in (("bias", bias), ("residual", residual)):
        if a is not None:
            names.append(name), args.append(a)
    whole = pl.BlockSpec((k,), lambda j: (0,))
    rows = pl.BlockSpec((bn,), lambda j: (j,))
    specs = dict(x=whole, scale=whole, shift=whole, bias=rows, residual=rows,
                 w=pl.BlockSpec((bn, k), lambda j: (j, 0)))
    kernel = functools.partial(_kernel, names=tuple(names), k=k, bk=bk, unroll=unroll,
                               norm=norm is not None, act=act, dtype=x.dtype)
    return pl.pallas_call(kernel, grid=(n // bn,), in_specs=[specs[a] for a in names],
                          out_specs=rows, out_shape=jax.ShapeDtypeStruct((n,), x.dtype),
                          interpret=not GPU,
                          compiler_params=plt.CompilerParams(num_warps=warps, num_stages=1))(*args)


def _kernel(*refs, names, k, bk, unroll, norm, act, dtype):
    from jax.experimental import pallas as pl
    ref = dict(zip(names, refs))
    out_ref = refs[-1]
    x_ref = ref["x"]
    if norm:
        cs = min(k & -k, 512)
        chunks = [x_ref[pl.ds(i * cs, cs)].astype(f32) for i in range(k // cs)]
        mean = sum(jnp.sum(c) for c in chunks) / k
        var = sum(jnp.sum(jnp.square(c - mean)) for c in chunks) / k
        rstd = jax.lax.rsqrt(var + EPS)

    def step(start, acc):
        cols = pl.ds(start, bk)
        xs = x_ref[cols].astype(f32)
        if norm:
            xs = round_to((xs - mean) * rstd * ref["scale"][cols].astype(f32)
                        + ref["shift"][cols].astype(f32), dtype)
        return acc + ref["w"][:, cols].astype(f32) * xs[None, :]

    def body(i, acc):
        for u in range(unroll):
            acc = step((i * unroll + u) * bk, acc)
        return acc

    acc = jax.lax.fori_loop(0, k // bk // unroll, body, jnp.zeros((out_ref.shape[0], bk), f32))
    acc = jnp.sum(acc, axis=1)
    out_ref[...] = epilogue(acc, ref["bias"][...] if "bias" in ref else None, act,
                            ref["residual"][...] if "residual" in ref else None, dtype)


def candidates(k, n):
    out = []
    for bn, bk, unroll, warps in itertools.product((2, 4, 8, 16, 32), (128, 256, 512, 1024),
                                                   (1, 2), (2, 4, 8)):
        if n % bn or k % (bk * unroll) or not 64 <= n // bn <= 8192:
            continue
        if not 1024 <= bn * bk <= 8192 or bn * bk // (32 * warps) > 64:
            continue
        out.append((bn, bk, unroll, warps))
    return out


def sample(cands, limit):
    if len(cands) <= limit:
        return cands
    step = len(cands) / limit
    return [cands[int(i * step)] for i in range(limit)]


def part1(limit, only, verbose):
    best = {}
    print(f"{'proj':>5}{'xla us':>9}{'xla dot':>9}{'ours us':>9}{'floor':>7}  best (bn, bk, unroll, "
          f"warps) of n tried, rel err")
    for name in PROJ:
        if only and name not in only:
            continue
        k, n = PROJ[name][:2]
        copies = 8
        x, ws, kw = make(name, copies, 7)
        t_dot = bench(jax.jit(lambda x, ws: jnp.stack([jnp.dot(x, w) for w in ws])), x, ws) / copies * 1e6
        t_xla, results = sweep(x, ws, kw, sample(candidates(k, n), limit),
                               lambda x, w, t, **kw: gemv_nk(x, w, tiles=t, **kw),
                               prepare=lambda w, t: w.T.copy(), verbose=verbose, tag=f"{name} ")
        us, t, err = results[0]
        best[name] = t
        print(f"{name:>5}{t_xla:>9.1f}{t_dot:>9.1f}{us:>9.1f}{2 * k * n / BW * 1e6:>7.1f}  {t} "
              f"({len(results)}), {err:.1e}; worst err {max(r[2] for r in results):.1e}", flush=True)
        del ws
    return best


def part2(best):
    x = jax.random.normal(jax.random.key(5), (PROJ["qkv"][0],)).astype(DT)

    def proj(name, x, w, bias, norm=None, act=None, residual=None):
        return gemv_nk(x, w, bias, norm=norm, act=act, residual=residual, tiles=best[name])
    transposed = lambda p: {a: (v.T.copy() if a in PROJ else v) for a, v in p.items()}
    time_chains(x, {"xla": (xla_layer, lambda p: p), "nk": (layer_with(proj), transposed)})


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=12, help="tile settings tried per projection")
    ap.add_argument("--only", default="", help="projections to sweep (default all)")
    ap.add_argument("--no-chain", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    best = part1(a.limit, a.only.split(",") if a.only else (), a.verbose)
    if not a.no_chain and len(best) == len(PROJ):
        part2(best)
