"""Probe: batch-1 decode projections as cuBLAS GEMVs vs XLA reduction fusions.

A batch-1 projection y = x W reads W once and does 2 flops a weight byte; XLA can also emit it as a
reduction (sum over K of x * W), which lets it fuse the LayerNorm's normalisation (a producer),
relu^2 (a producer) and the bias + residual add (an epilogue) into the same kernel, where cuBLAS
needs a kernel for each. Part 1 times single projections (weights [K, N] for the dot and the column
reduction, [N, K] for the row reduction); part 2 times a 32-layer chain of the 8B layer's
projections (no attention) in each form and counts its kernels.

  python benchmarks/probe_gemv.py
"""

from probe_common import BW, bench

import jax
import jax.numpy as jnp

D, F, L = (3328, 26624, 32) if jax.default_backend() == "gpu" else (64, 256, 2)


def kernels(fn, *args):
    text = jax.jit(fn).lower(*args).compile().as_text()
    entry = text[text.index("ENTRY"):]
    return {s.strip(" ("): entry.count(s) for s in (" fusion(", " custom-call(")}


def dot(x, w):  # x [K] bf16, w [K, N]
    return jnp.dot(x, w)


def col(x, w):  # w [K, N]
    return jnp.sum(x.astype(jnp.float32)[:, None] * w.astype(jnp.float32), axis=0).astype(x.dtype)


def row(x, wt):  # wt [N, K]
    return jnp.sum(wt.astype(jnp.float32) * x.astype(jnp.float32)[None, :], axis=1).astype(x.dtype)


def part1():
    print(f"{'K':>6}{'N':>7}{'dot us':>9}{'col us':>9}{'row us':>9}{'floor us':>10}")
    n_w = 8
    for k, n in ((D, 3 * D), (D, D), (D, F), (F, D)):
        x = jax.random.normal(jax.random.key(0), (k,), jnp.bfloat16)
        ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) for i in range(n_w)]
        wts = [w.T.copy() for w in ws]
        res = []
        for op, args in ((dot, ws), (col, ws), (row, wts)):
            f = jax.jit(lambda x, ws, op=op: jnp.stack([op(x, w) for w in ws]))
            res.append(bench(f, x, args) / n_w * 1e6)
        ref = jnp.dot(x, ws[0], preferred_element_type=jnp.float32)
        for op, w in ((col, ws[0]), (row, wts[0])):
            err = float(jnp.max(jnp.abs(op(x, w).astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
            assert err < 1e-2, (op.__name__, err)
        print(f"{k:>6}{n:>7}{res[0]:>9.1f}{res[1]:>9.1f}{res[2]:>9.1f}{2 * k * n / BW * 1e6:>10.1f}")
        del ws, wts


def ln(x, g, b):
    x32 = x.astype(jnp.float32)
    m = jnp.mean(x32)
    v = jnp.mean(jnp.square(x32 - m))
    return ((x32 - m) * jax.lax.rsqrt(v + 1e-5) * g + b).astype(x.dtype)


def layer(proj, x, p):
    h = ln(x, p["g1"], p["b1"])
    qkv = proj(h, p["qkv"]) + p["bqkv"]
    attn = qkv[2 * D:]  # stands in for attention's output (v), shape [D]
    x = x + (proj(attn, p["o"]) + p["bo"])
    h = ln(x, p["g2"], p["b2"])
    a = jnp.square(jnp.maximum(proj(h, p["up"]) + p["bup"], 0))
    return x + (proj(a, p["down"]) + p["bdown"])


def part2():
    def make(i, transposed):
        ks = jax.random.split(jax.random.key(i), 4)
        shapes = {"qkv": (D, 3 * D), "o": (D, D), "up": (D, F), "down": (F, D)}
        p = {n: jax.random.normal(k, s, jnp.bfloat16) * 0.02 for k, (n, s) in zip(ks, shapes.items())}
        if transposed:  # the same weights, stored [N, K]
            p = {n: w.T.copy() for n, w in p.items()}
        p.update(bqkv=jnp.zeros(3 * D, jnp.bfloat16), bo=jnp.zeros(D, jnp.bfloat16),
                 bup=jnp.zeros(F, jnp.bfloat16), bdown=jnp.zeros(D, jnp.bfloat16),
                 g1=jnp.ones(D), b1=jnp.zeros(D), g2=jnp.ones(D), b2=jnp.zeros(D))
        return p
    x = jax.random.normal(jax.random.key(99), (D,), jnp.bfloat16)
    floor = L * 2 * (3 * D * D + D * D + 2 * D * F) / BW * 1e3
    out = {}
    for name, proj, transposed in (("dot", dot, False), ("row", row, True), ("col", col, False)):
        params = [make(i, transposed) for i in range(L)]

        def net(x, params, proj=proj):
            for p in params:
                x = layer(proj, x, p)
            return x
        f = jax.jit(net)
        t = bench(f, x, params, reps=20) * 1e3
        out[name] = f(x, params).astype(jnp.float32)
        print(f"{name}: {t:.3f} ms for {L} layers (weight floor {floor:.3f} ms), "
              f"kernels {kernels(net, x, params)}", flush=True)
        del params
    for name in ("row", "col"):
        err = float(jnp.max(jnp.abs(out[name] - out["dot"])) / jnp.max(jnp.abs(out["dot"])))
        print(f"{name} vs dot: max rel diff {err:.2e}")


if __name__ == "__main__":
    print(jax.devices()[0].device_kind, jax.__version__)
    part1()
    part2()
