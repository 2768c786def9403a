"""What the decode-projection probes share (`probe_decode_linear.py`, `probe_gemv_nk.py`,
`probe_cuda_gemv.py`): the 8B layer's four projections, the model's XLA path for each (LayerNorm,
bf16-output dot, float32 bias add, relu^2, residual), the roundings a fused kernel must reproduce,
random inputs, and a timed chain of layers built from any projection function.

On CPU the shapes shrink so that each probe's kernels can be checked in interpret mode."""

from probe_common import BW, bench

import jax
import jax.numpy as jnp

GPU = jax.default_backend() == "gpu"
D, F, L = (3328, 26624, 32) if GPU else (256, 512, 2)
EPS = 1e-5
DT = jnp.bfloat16 if GPU else jnp.float32
f32 = jnp.float32

PROJ = {  # name: (K, N, uses norm, act, uses residual)
    "qkv": (D, 3 * D, True, None, False),
    "o": (D, D, False, None, True),
    "up": (D, F, True, "relu2", False),
    "down": (F, D, False, None, True),
}


def round_to(v, dtype):
    return v.astype(dtype).astype(f32)


def epilogue(acc, bias, act, residual, dtype):
    """The model's roundings after a float32 product: GEMM output, + bias, relu^2, + residual,
    each in `dtype`."""
    y = round_to(acc, dtype)
    if bias is not None:
        y = round_to(y + bias.astype(f32), dtype)
    if act == "relu2":
        y = round_to(jnp.square(jnp.maximum(y, 0.0)), dtype)
    if residual is not None:
        y = residual.astype(f32) + y
    return y.astype(dtype)


def ln(x, g, b):
    x32 = x.astype(f32)
    m = jnp.mean(x32, -1, keepdims=True)
    v = jnp.mean(jnp.square(x32 - m), -1, keepdims=True)
    return ((x32 - m) * jax.lax.rsqrt(v + EPS) * g + b).astype(x.dtype)


def xla_proj(x, w, bias, norm=None, act=None, residual=None):
    """The model's XLA path over [K, N] weights: bf16-output dot, float32 bias add, relu^2,
    residual."""
    if norm is not None:
        x = ln(x, norm[0], norm[1])
    y = jnp.dot(x, w, preferred_element_type=x.dtype)
    y = (y.astype(f32) + bias.astype(f32)).astype(x.dtype)
    if act == "relu2":
        y = jnp.square(jax.nn.relu(y))
    return y if residual is None else residual + y


def make(name, copies, key, rows=None):
    """x ([K], or [rows, K]), `copies` random weights [K, N], and the projection's keyword
    arguments (bias; norm (scale, shift); act; residual) as `xla_proj` takes them."""
    k, n, has_norm, act, has_res = PROJ[name]
    lead = () if rows is None else (rows,)
    ks = jax.random.split(jax.random.key(key), 6)
    ws = [(0.02 * jax.random.normal(jax.random.fold_in(ks[0], i), (k, n))).astype(DT)
          for i in range(copies)]
    x = jax.random.normal(ks[1], lead + (k,)).astype(DT)
    kw = dict(bias=(0.02 * jax.random.normal(ks[2], (n,))).astype(DT))
    if has_norm:
        kw["norm"] = ((1 + 0.1 * jax.random.normal(ks[3], (k,))).astype(DT),
                      (0.1 * jax.random.normal(ks[4], (k,))).astype(DT))
    if act:
        kw["act"] = act
    if has_res:
        kw["residual"] = jax.random.normal(ks[5], lead + (n,)).astype(DT)
    return x, ws, kw


def layer_params(i):
    """One random layer of the chain: weights [K, N] under the projections' names, biases "b<name>",
    LayerNorm scales / shifts g1, s1, g2, s2."""
    ks = jax.random.split(jax.random.key(100 + i), 8)
    p = {name: (0.02 * jax.random.normal(ks[j], PROJ[name][:2])).astype(DT)
         for j, name in enumerate(PROJ)}
    for j, name in enumerate(PROJ):
        p["b" + name] = (0.02 * jax.random.normal(ks[4 + j], (PROJ[name][1],))).astype(DT)
    p.update(g1=(1 + 0.1 * jax.random.normal(ks[0], (D,))).astype(DT), s1=jnp.zeros(D, DT),
             g2=jnp.ones(D, DT), s2=(0.1 * jax.random.normal(ks[1], (D,))).astype(DT))
    return p


def layer_with(proj):
    """The decode layer's projections (attention's output stood in for by v) from
    proj(name, x, w, bias, norm=(scale, shift) | None, act=..., residual=...)."""
    def layer(x, p):
        qkv = proj("qkv", x, p["qkv"], p["bqkv"], norm=(p["g1"], p["s1"]))
        x = proj("o", qkv[..., 2 * D:], p["o"], p["bo"], residual=x)
        h = proj("up", x, p["up"], p["bup"], norm=(p["g2"], p["s2"]), act="relu2")
        return proj("down", h, p["down"], p["bdown"], residual=x)
    return layer


xla_layer = layer_with(lambda name, *args, **kw: xla_proj(*args, **kw))


def time_chains(x, variants, label="", profile=""):
    """variants: {name: (layer(x, p), prepare(p) -> p)}. Times an L-layer jitted chain of each
    over the same random layers and prints it, with the largest difference to the first variant
    relative to its largest value; `profile`: also trace each chain there (kernel time by kernel)."""
    ps = [layer_params(i) for i in range(L)]
    out = {}
    for name, (layer, prepare) in variants.items():
        qs = [prepare(p) for p in ps]

        def net(x, qs, layer=layer):
            for p in qs:
                x = layer(x, p)
            return x
        f = jax.jit(net)
        t = bench(f, x, qs, reps=20) * 1e3
        out[name] = (t, f(x, qs).astype(f32))
        print(f"  {label}{name}: {t:.3f} ms", flush=True)
        if profile:
            import profile_gpu
            d, wall = profile_gpu.trace(lambda f=f, qs=qs: f(x, qs), 5, profile, name)
            print(profile_gpu.summarize(d, 5, wall, top=14), flush=True)
        del qs
    first, (_, want) = next(iter(out.items()))
    scale = float(jnp.max(jnp.abs(want)))
    floor = L * 2 * (4 * D * D + 2 * D * F) / BW * 1e3
    print(f"chain of {L} layers {label}(weight floor {floor:.3f} ms): " + ", ".join(
        f"{name} {t:.3f} ms (max diff to {first} {float(jnp.max(jnp.abs(y - want))) / scale:.1e})"
        for name, (t, y) in out.items()), flush=True)


def sweep(x, ws, kw, settings, call, prepare=None, verbose=False, tag=""):
    """XLA's path and call(x, w, setting, **kw) for each setting, each timed over all of `ws` in one
    jitted call (so nothing is served from L2) and checked against XLA's result; `prepare(w,
    setting)` lays a weight out for the kernel. Returns XLA's microseconds a projection and
    [(microseconds, setting, relative difference)], fastest first; a setting the compiler or the
    kernel rejects is printed and skipped."""
    copies = len(ws)
    xla = jax.jit(lambda x, ws: jnp.stack([xla_proj(x, w, **kw) for w in ws]))
    t_xla = bench(xla, x, ws) / copies * 1e6
    want = xla(x, ws[:1])[0].astype(f32)
    results = []
    for s in settings:
        f = jax.jit(lambda x, ws, s=s: jnp.stack([call(x, w, s, **kw) for w in ws]))
        laid = ws if prepare is None else [prepare(w, s) for w in ws]
        try:
            got = f(x, laid[:1])[0].astype(f32)
            us = bench(f, x, laid) / copies * 1e6
        except Exception as e:
            print(f"    {tag}{s}: {type(e).__name__}: {str(e)[:150]}")
            continue
        err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        results.append((us, s, err))
        if verbose:
            print(f"    {tag}{us:7.1f} us  {s}  err {err:.1e}", flush=True)
        del laid
    results.sort(key=lambda r: r[0])
    return t_xla, results
