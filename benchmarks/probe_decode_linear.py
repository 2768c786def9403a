"""Probe: a decode projection as one Pallas kernel (`decode_linear.fused_linear`: LayerNorm
prologue, bias / relu^2 / residual epilogue) vs the model's XLA path (LayerNorm kernels, cuBLAS or
Triton GEMM, epilogue fusions), on the 8B layer's four projections at 1, 16 and 64 rows.

Part 1 sweeps tiles per projection and row count (each time: 8 weight copies in one jitted call,
so nothing is served from L2) and checks each result against XLA's; part 2 times a 32-layer chain
of the four projections (no attention), XLA vs the fused kernels with the best tiles of part 1.

  python benchmarks/probe_decode_linear.py [--rows 1,16,64] [--quick]
"""

import argparse
import itertools

from probe_common import BW, bench

import jax
import jax.numpy as jnp

from jais2_jax.decode_linear import Tiles, default_tiles, fused_linear

GPU = jax.default_backend() == "gpu"
D, F, L = (3328, 26624, 32) if GPU else (256, 512, 2)
EPS = 1e-5
DT = jnp.bfloat16 if GPU else jnp.float32


def ln(x, g, b):
    x32 = x.astype(jnp.float32)
    m = jnp.mean(x32, -1, keepdims=True)
    v = jnp.mean(jnp.square(x32 - m), -1, keepdims=True)
    return ((x32 - m) * jax.lax.rsqrt(v + EPS) * g + b).astype(x.dtype)


def xla_proj(x, w, bias, norm=None, act=None, residual=None):
    """The model's XLA path: Linear's bf16-output dot, float32 bias add, relu^2, residual."""
    if norm is not None:
        x = ln(x, norm[0], norm[1])
    y = jnp.dot(x, w, preferred_element_type=x.dtype)
    y = (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
    if act == "relu2":
        y = jnp.square(jax.nn.relu(y))
    return y if residual is None else residual + y


PROJ = {  # name: (K, N, uses norm, act, uses residual)
    "qkv": (D, 3 * D, True, None, False),
    "o": (D, D, False, None, True),
    "up": (D, F, True, "relu2", False),
    "down": (F, D, False, None, True),
}


def candidates(m, k, n, quick):
    out = [default_tiles(m, k, n)]
    if quick:
        return out
    splits = (1,) if n >= 8192 else (1, 2, 4, 8)
    for bn, bk, unroll, split, warps in itertools.product((16, 32, 64, 128), (64, 128, 256),
                                                         (1, 2, 4), splits, (4, 8)):
        if bn == 16 and n >= 8192 or bn == 128 and n < 8192 or bk * unroll > 512:
            continue
        if (k // split) % (bk * unroll) or n // bn * split < 96 or n // bn * split > 1024:
            continue
        if m > 1 and bn < 32:
            continue
        out.append(Tiles(bn, bk, unroll, split, warps, 1 if m == 1 else 3))
    return out


def sample(cands, limit):
    """At most `limit` candidates, spread over the list (the default first)."""
    if len(cands) <= limit:
        return cands
    step = len(cands) / (limit - 1)
    return [cands[0]] + [cands[1 + int(i * step) % (len(cands) - 1)] for i in range(limit - 1)]


def make(name, m, copies, key):
    k, n, has_norm, act, has_res = PROJ[name]
    ks = jax.random.split(jax.random.key(key), 6)
    ws = [(0.02 * jax.random.normal(jax.random.fold_in(ks[0], i), (k, n))).astype(DT)
          for i in range(copies)]
    x = jax.random.normal(ks[1], (m, k)).astype(DT)
    kw = dict(bias=(0.02 * jax.random.normal(ks[2], (n,))).astype(DT))
    if has_norm:
        kw["norm"] = ((1 + 0.1 * jax.random.normal(ks[3], (k,))).astype(DT),
                      (0.1 * jax.random.normal(ks[4], (k,))).astype(DT))
    if act:
        kw["act"] = act
    if has_res:
        kw["residual"] = jax.random.normal(ks[5], (m, n)).astype(DT)
    return x, ws, kw


def part1(rows, quick, limit):
    best = {}
    print(f"{'proj':>5}{'M':>4}{'xla us':>9}{'ours us':>9}{'floor':>7}  best tiles (of n tried), err")
    for name, m in itertools.product(PROJ, rows):
        k, n = PROJ[name][:2]
        copies = 8
        x, ws, kw = make(name, m, copies, 7)
        norm = kw.get("norm")
        fkw = dict(kw, norm=None if norm is None else (*norm, EPS))

        xla = jax.jit(lambda x, ws: jnp.stack([xla_proj(x, w, **kw) for w in ws]))
        t_xla = bench(xla, x, ws) / copies * 1e6
        want = xla(x, ws[:1])[0].astype(jnp.float32)
        results = []
        for t in sample(candidates(m, k, n, quick), limit):
            f = jax.jit(lambda x, ws, t=t: jnp.stack([fused_linear(x, w, tiles=t, **fkw)
                                                      for w in ws]))
            try:
                got = f(x, ws[:1])[0].astype(jnp.float32)
                us = bench(f, x, ws) / copies * 1e6
            except Exception as e:  # a tile setting Triton rejects: say so, go on
                print(f"    {name} M={m} {t}: {type(e).__name__}: {str(e)[:120]}")
                continue
            err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
            results.append((us, t, err))
        default_us = {r[1]: r[0] for r in results}
        results.sort(key=lambda r: r[0])
        us, t, err = results[0]
        best[name, m] = t
        floor = 2 * k * n / BW * 1e6
        print(f"{name:>5}{m:>4}{t_xla:>9.1f}{us:>9.1f}{floor:>7.1f}  {t} ({len(results)}), "
              f"{err:.1e}; default tiles {default_us.get(default_tiles(m, k, n), float('nan')):.1f}",
              flush=True)
        del ws
    return best


def part2(rows, best):
    def params(i):
        ks = jax.random.split(jax.random.key(100 + i), 8)
        p = {name: (0.02 * jax.random.normal(ks[j], PROJ[name][:2])).astype(DT)
             for j, name in enumerate(PROJ)}
        for j, name in enumerate(PROJ):
            p["b" + name] = (0.02 * jax.random.normal(ks[4 + j], (PROJ[name][1],))).astype(DT)
        p.update(g1=jnp.ones(D, DT), s1=jnp.zeros(D, DT), g2=jnp.ones(D, DT), s2=jnp.zeros(D, DT))
        return p

    ps = [params(i) for i in range(L)]
    for m in rows:
        x = jax.random.normal(jax.random.key(5), (m, D)).astype(DT)

        def xla_layer(x, p):
            qkv = xla_proj(x, p["qkv"], p["bqkv"], norm=(p["g1"], p["s1"]))
            x = xla_proj(qkv[:, 2 * D:], p["o"], p["bo"], residual=x)
            h = xla_proj(x, p["up"], p["bup"], norm=(p["g2"], p["s2"]), act="relu2")
            return xla_proj(h, p["down"], p["bdown"], residual=x)

        def fused_layer(x, p):
            tl = lambda name: best.get((name, m))
            qkv = fused_linear(x, p["qkv"], p["bqkv"], norm=(p["g1"], p["s1"], EPS), tiles=tl("qkv"))
            x = fused_linear(qkv[:, 2 * D:], p["o"], p["bo"], residual=x, tiles=tl("o"))
            h = fused_linear(x, p["up"], p["bup"], norm=(p["g2"], p["s2"], EPS), act="relu2",
                             tiles=tl("up"))
            return fused_linear(h, p["down"], p["bdown"], residual=x, tiles=tl("down"))

        out = {}
        for label, layer in (("xla", xla_layer), ("fused", fused_layer)):
            def net(x, ps, layer=layer):
                for p in ps:
                    x = layer(x, p)
                return x
            f = jax.jit(net)
            t = bench(f, x, ps, reps=20) * 1e3
            out[label] = (t, f(x, ps).astype(jnp.float32))
        floor = L * 2 * (4 * D * D + 2 * D * F) / BW * 1e3
        err = float(jnp.max(jnp.abs(out["fused"][1] - out["xla"][1])) / jnp.max(jnp.abs(out["xla"][1])))
        print(f"chain M={m}: xla {out['xla'][0]:.3f} ms, fused {out['fused'][0]:.3f} ms, "
              f"floor {floor:.3f} ms; max rel diff {err:.1e}", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,16,64")
    ap.add_argument("--quick", action="store_true", help="default tiles only")
    ap.add_argument("--limit", type=int, default=14, help="tile settings tried per case")
    ap.add_argument("--no-chain", action="store_true")
    a = ap.parse_args()
    rows = tuple(int(r) for r in a.rows.split(","))
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    best = part1(rows, a.quick, a.limit)
    if not a.no_chain:
        part2(rows, best)
