"""Probe: cost of the float32-output matmul formulation in `model.Linear` on the GPU.

`Linear` computes dot(x, W) with preferred_element_type=float32, adds the bias in float32 and
casts to the compute dtype. The alternative is a bf16-output GEMM (cuBLAS and XLA still
accumulate in float32 inside the GEMM; only the output is rounded once more, before the bias).
Times both for the prefill (M=2048) and decode (M=1, 16, 64) shapes of the 8B model.

  python benchmarks/probe_linear.py
"""

import statistics
import time

import jax
import jax.numpy as jnp


def bench(fn, *args, reps=50):
    fn(*args).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(*args).block_until_ready()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


N_W = 8  # separate weight arrays per call, so launch overhead is amortised and L2 can't hold them


def _f32_out(x, w, b):
    y = jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return (y + b.astype(jnp.float32)).astype(jnp.bfloat16)


def _bf16_out(x, w, b):
    return jnp.dot(x, w) + b


def chain(op):
    @jax.jit
    def f(x, ws, b):
        return jnp.stack([op(x, w, b) for w in ws])  # independent GEMMs, one per weight
    return f


f32_out, bf16_out = chain(_f32_out), chain(_bf16_out)


key = jax.random.key(0)
print(f"{'M':>6}{'K':>7}{'N':>7}{'f32-out us':>12}{'bf16-out us':>13}{'bytes floor us':>16}{'flop floor us':>15}")
for m in (1, 16, 64, 2048):
    for k, n in ((3328, 26624), (26624, 3328), (3328, 3328)):
        x = jax.random.normal(key, (m, k), jnp.bfloat16)
        ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02 for i in range(N_W)]
        b = jax.random.normal(key, (n,), jnp.bfloat16)
        a, c = bench(f32_out, x, ws, b) / N_W, bench(bf16_out, x, ws, b) / N_W
        floor_b = 2 * (m * k + k * n + m * n) / 4.3e12
        floor_f = 2 * m * k * n / 790e12
        print(f"{m:>6}{k:>7}{n:>7}{a * 1e6:>12.1f}{c * 1e6:>13.1f}{floor_b * 1e6:>16.1f}{floor_f * 1e6:>15.1f}")
