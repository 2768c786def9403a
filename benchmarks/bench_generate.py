"""Generation speed: jais2_jax vs transformers (PyTorch) on the same shapes, in one command.

Random weights of the released Jais2 8B shape in bf16 (vocab 150272, hidden 3328, inter 26624,
32 layers, 26 heads, 26 kv heads). Measured, ours and transformers:
  decode at batch 1, 16, 64 (prompt 128, 128 new tokens): end-to-end generate tok/s (what
  transformers' anchor measured), and for ours also the decode loop alone in ms/step;
  batch 1 at a 4096-token context (prompt 3968 + 128 new) against the 256-token figure;
  prefill 1 x 2048 (logits of the last token only); compile time (first call minus a warm one).
transformers runs eager (dynamic cache) and, at batch 1, static cache + torch.compile.

Each side runs in its own child process (JAX and torch would otherwise fight over GPU memory);
the parent prints one table. Times are medians of --reps runs after a warm-up, synchronised
(block_until_ready / cuda.synchronize) before the host clock is read.

  python benchmarks/bench_generate.py                 # GPU, both sides (fits one 10-minute call)
  python benchmarks/bench_generate.py --skip-hf       # ours only
  python benchmarks/bench_generate.py --tiny          # CPU check of the script, tiny model
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

# Run from a checkout without installing: the package sits one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PREFIX = "RESULT "
SHAPE_8B = dict(vocab_size=150272, hidden_size=3328, intermediate_size=26624, num_hidden_layers=32,
                num_attention_heads=26, num_key_value_heads=26, max_position_embeddings=8192)
SHAPE_70B = dict(vocab_size=150272, hidden_size=7168, intermediate_size=57344, num_hidden_layers=68,
                 num_attention_heads=56, num_key_value_heads=56, head_dim=128,
                 max_position_embeddings=8192)
SHAPE_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)


def plan(tiny: bool, shape: str = "8b") -> dict:
    if shape == "70b" and not tiny:  # one card: the int8 weights (~70 GB) fit, bf16 does not
        return dict(shape=SHAPE_70B, batches=(1,), prompt=128, new=64, long_prompt=None,
                    prefill=None, dtype="bfloat16")
    if tiny:
        return dict(shape=SHAPE_TINY, batches=(1, 4), prompt=16, new=16, long_prompt=112,
                    prefill=64, dtype="float32")
    return dict(shape=SHAPE_8B, batches=(1, 16, 64), prompt=128, new=128, long_prompt=3968,
                prefill=2048, dtype="bfloat16")


def emit(**kw) -> None:
    print(PREFIX + json.dumps(kw), flush=True)


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------- ours
def random_params(config, dtype, fuse_qkv=True, seed=0, quantization=None):
    """Per-layer (scan_layers=False) parameters, random normal (std 0.02; norms near 1), made
    on the device one array at a time. Zeros would hide bugs and can time differently. With
    `quantization`, the projections are random int8 / fp8 values with scales made directly (no
    bf16 copy: the 70B shape's int8 weights fit one H100, its bf16 ones do not)."""
    import jax
    import jax.numpy as jnp
    from jais2_jax import ModelOptions, build_inference_program

    program = build_inference_program(config, batch_size=1, max_length=1, dtype=dtype,
                                      options=ModelOptions(scan_layers=False, fuse_qkv=fuse_qkv),
                                      quantization=quantization)
    model, shapes = program.model, program.abstract_params()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def make(key, shape, kind, out_dtype):  # compiled once per distinct shape, not per array
        noise = jax.random.normal(key, shape, jnp.float32)
        if kind == "values":  # quantized values spread like a normal weight's
            return jnp.clip(jnp.round(noise * 40.0), -127, 127).astype(out_dtype)
        if kind == "qscale":  # values * scale ~ std 0.02
            return jnp.full(shape, 0.02 / 40.0, jnp.float32) * (1.0 + 0.01 * noise)
        return ((1.0 if kind == "norm" else 0.0) + 0.02 * noise).astype(out_dtype)

    out = []
    for i, (path, leaf) in enumerate(leaves):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        if "norm" in name and name.endswith("scale"):
            kind = "norm"
        elif name.endswith("kernel") and jnp.dtype(leaf.dtype).itemsize == 1:
            kind = "values"
        elif name.endswith("/scale"):
            kind = "qscale"
        else:
            kind = "float"
        out.append(make(jax.random.key(seed * 100003 + i), leaf.shape, kind,
                        jnp.dtype(leaf.dtype)))
    return model, jax.tree_util.tree_unflatten(treedef, out)


def run_ours(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jais2_jax import Jais2Config, init_cache
    from jais2_jax.inference.generate import decode_loop, generate, prefill
    from jais2_jax.model.options import as_dtype
    from jais2_jax.inference.sampling import Sampler

    p = plan(args.tiny, args.shape)
    dtype = as_dtype(p["dtype"])
    config = Jais2Config(**p["shape"], bos_token_id=0, eos_token_id=1, pad_token_id=0)
    emit(what="device", side="jax", name=str(jax.devices()[0].device_kind), jax=jax.__version__,
         quantize=args.quantize or "none", shape=args.shape)
    t = time.perf_counter()
    model, params = random_params(config, dtype, fuse_qkv=not args.unfused_qkv,
                                  quantization=args.quantize)
    jax.block_until_ready(params)
    if args.attention:
        model = model.with_options(attention_impl=args.attention)
    n_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    emit(what="params", side="jax", bytes=n_bytes, seconds=time.perf_counter() - t)
    rs = np.random.RandomState(0)

    def case(name, batch, prompt, new):
        ids = rs.randint(2, config.vocab_size, (batch, prompt)).astype(np.int32)
        gen = lambda: np.asarray(generate(model, params, ids, max_new_tokens=new,  # noqa: E731
                                          eos_token_id=[]))
        first = median_time(gen, 1)
        e2e = median_time(gen, args.reps)
        # The decode loop alone: a fresh prefilled cache each time (it is donated).
        cache_len = -(-(prompt + new - 1) // 128) * 128
        times = []
        for _ in range(args.reps):
            cache = init_cache(config, batch, cache_len, dtype=dtype, per_layer=True)
            logits, cache = prefill(model, params, jnp.asarray(ids), jnp.ones_like(ids), cache)
            jax.block_until_ready((logits, cache))
            t = time.perf_counter()
            out, cache = decode_loop(model, params, logits, cache, None, max_new_tokens=new,
                                      sampler=Sampler(), eos_ids=(), pad_id=0, callback=None)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t)
            del cache
        loop = statistics.median(times)
        emit(what=name, side="jax", batch=batch, prompt=prompt, new=new, e2e_s=e2e,
             e2e_tok_s=batch * new / e2e, loop_ms_per_step=loop / (new - 1) * 1e3,
             loop_tok_s=batch * (new - 1) / loop, compile_s=first - e2e)

    for b in p["batches"]:
        guard(case, f"decode_b{b}", b, p["prompt"], p["new"])
    if p["long_prompt"]:
        guard(case, "decode_long_b1", 1, p["long_prompt"], p["new"])

    def prefill_case():
        ids = jnp.asarray(rs.randint(2, config.vocab_size, (1, p["prefill"])).astype(np.int32))
        mask = jnp.ones_like(ids)

        def once():
            cache = init_cache(config, 1, p["prefill"], dtype=dtype, per_layer=True)
            jax.block_until_ready(cache)
            t = time.perf_counter()
            jax.block_until_ready(prefill(model, params, ids, mask, cache))
            return time.perf_counter() - t

        first = once()
        s = statistics.median([once() for _ in range(max(args.reps, 5))])
        emit(what="prefill", side="jax", tokens=p["prefill"], seconds=s, compile_s=first - s)

    if p["prefill"]:
        guard(prefill_case)


ONLY: set[str] | None = None  # --only


def guard(fn, *a, **kw):
    """One failed measurement is reported, not fatal to the rest; figures not in --only are skipped."""
    if ONLY is not None and (a[0] if a else "prefill") not in ONLY:
        return
    try:
        fn(*a, **kw)
    except Exception as e:  # noqa: BLE001
        emit(what=a[0] if a else fn.__name__, side="error", error=f"{type(e).__name__}: {e}"[:300])


# ------------------------------------------------------------------------------------ transformers
def run_hf(args) -> None:
    import torch
    import transformers
    from transformers import Jais2Config, Jais2ForCausalLM

    p = plan(args.tiny, args.shape)
    if args.shape == "70b" and not args.tiny:
        emit(what="device", side="hf", name="skipped: the 70B shape does not fit one card in bf16")
        return
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if p["dtype"] == "bfloat16" else torch.float32
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    emit(what="device", side="hf", name=torch.cuda.get_device_name(0) if dev.type == "cuda"
         else "cpu", torch=torch.__version__, transformers=transformers.__version__)
    cfg = Jais2Config(**p["shape"], bos_token_id=0, eos_token_id=1, pad_token_id=0)
    torch.set_default_dtype(dtype)
    with torch.device(dev):
        model = Jais2ForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    g = torch.Generator(device="cpu").manual_seed(0)

    def timed(fn, reps):
        def once():
            fn()
            sync()
        return median_time(once, reps)

    def gen_case(name, batch, prompt, new, **extra):
        ids = torch.randint(2, cfg.vocab_size, (batch, prompt), generator=g).to(dev)
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, **extra)
        with torch.no_grad():
            first = timed(lambda: model.generate(ids, **kw), 1)
            if extra:  # static cache + compile: the second call still recompiles for decode
                first += timed(lambda: model.generate(ids, **kw), 1)
            s = timed(lambda: model.generate(ids, **kw), args.hf_reps)
        emit(what=name, side="hf" + ("_static" if extra else ""), batch=batch, prompt=prompt,
             new=new, e2e_s=s, e2e_tok_s=batch * new / s, warmup_s=first)

    ids = torch.randint(2, cfg.vocab_size, (1, p["prefill"]), generator=g).to(dev)
    with torch.no_grad():
        timed(lambda: model(ids, logits_to_keep=1), 2)
        s = timed(lambda: model(ids, logits_to_keep=1), 5)
    emit(what="prefill", side="hf", tokens=p["prefill"], seconds=s)
    for b in p["batches"]:
        guard(gen_case, f"decode_b{b}", b, p["prompt"], p["new"])
    if p["long_prompt"]:
        guard(gen_case, "decode_long_b1", 1, p["long_prompt"], p["new"])
    if args.hf_static:
        guard(gen_case, "decode_b1", 1, p["prompt"], p["new"], cache_implementation="static")


# ------------------------------------------------------------------------------------------ table
GOALS = {"decode_b1": 180, "decode_b16": 2700, "decode_b64": 8000}


def table(results: list[dict], tiny: bool) -> str:
    by = {(r["what"], r["side"]): r for r in results}
    lines = []
    for r in results:
        if r["what"] == "device":
            lines.append(f"{r['side']}: {r['name']} "
                         + " ".join(f"{k}={v}" for k, v in r.items()
                                    if k not in ("what", "side", "name")))
    for r in results:
        if r["side"] == "error":
            lines.append(f"ERROR {r['what']}: {r['error']}")
    lines.append("")
    head = (f"{'figure':<16}{'ours e2e tok/s':>15}{'ours loop ms/step':>19}{'ours loop tok/s':>17}"
            f"{'HF eager tok/s':>16}{'HF static tok/s':>17}{'goal':>8}")
    lines += [head, "-" * len(head)]

    def f(x, spec=".1f"):
        return "-" if x is None else format(x, spec)

    for name in [w for w in dict.fromkeys(r["what"] for r in results) if w.startswith("decode")]:
        o, h, hs = by.get((name, "jax"), {}), by.get((name, "hf"), {}), by.get((name, "hf_static"), {})
        lines.append(f"{name:<16}{f(o.get('e2e_tok_s')):>15}{f(o.get('loop_ms_per_step'), '.2f'):>19}"
                     f"{f(o.get('loop_tok_s')):>17}{f(h.get('e2e_tok_s')):>16}"
                     f"{f(hs.get('e2e_tok_s')):>17}{f(GOALS.get(name), 'd'):>8}")
    short, long_ = by.get(("decode_b1", "jax")), by.get(("decode_long_b1", "jax"))
    if short and long_:
        ratio = long_["loop_ms_per_step"] / short["loop_ms_per_step"]
        lines.append(f"long context (prompt {long_['prompt']}) / short, ms per step: {ratio:.3f} "
                     "(goal <= 1.15)")
    po, ph = by.get(("prefill", "jax")), by.get(("prefill", "hf"))
    if po or ph:
        lines.append(f"prefill 1x{(po or ph)['tokens']}: ours {f(po and po['seconds'] * 1e3, '.1f')} ms, "
                     f"HF {f(ph and ph['seconds'] * 1e3, '.1f')} ms (goal <= 45 ms)")
    compiles = {r["what"]: r["compile_s"] for r in results if r["side"] == "jax" and "compile_s" in r}
    if compiles:
        lines.append("ours compile s (first call - warm call): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in compiles.items()) + " (goal <= 30)")
    hs = by.get(("decode_b1", "hf_static"))
    if hs:
        lines.append(f"HF static+compile warm-up (2 calls): {hs['warmup_s']:.1f} s")
    if tiny:
        lines.append("(--tiny: CPU, tiny model: checks the script, not the speed)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the script")
    parser.add_argument("--skip-hf", action="store_true", help="only measure jais2_jax")
    parser.add_argument("--skip-ours", action="store_true", help="only measure transformers")
    parser.add_argument("--no-hf-static", dest="hf_static", action="store_false",
                        help="skip transformers' static cache + torch.compile (about 40 s)")
    parser.add_argument("--attention", choices=("xla", "cudnn"), default=None,
                        help="force our attention implementation (default: by backend)")
    parser.add_argument("--unfused-qkv", action="store_true",
                        help="separate q/k/v GEMMs (the default fuses them, as jais2 generate does)")
    parser.add_argument("--only", default=None,
                        help="comma-separated figures to measure (decode_b1,decode_b16,decode_b64,"
                             "decode_long_b1,prefill); default all")
    parser.add_argument("--quantize", choices=("int8", "fp8"), default=None,
                        help="our weights quantized (transformers stays bf16, as the reference)")
    parser.add_argument("--shape", choices=("8b", "70b"), default="8b",
                        help="70b: batch 1 only, ours only (bf16 does not fit one H100)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hf-reps", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write all results to this file")
    parser.add_argument("--side", choices=("jax", "hf"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global ONLY
    ONLY = None if args.only is None else set(args.only.split(","))
    if args.tiny:
        args.hf_static = False
    if args.side == "jax":
        run_ours(args)
        return 0
    if args.side == "hf":
        run_hf(args)
        return 0

    results = []
    sides = [s for s, skip in (("jax", args.skip_ours), ("hf", args.skip_hf)) if not skip]
    for side in sides:
        env = dict(os.environ)
        if args.tiny:
            env["JAX_PLATFORMS"] = "cpu"
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [sys.executable, os.path.abspath(__file__), "--side", side] + sys.argv[1:]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        got = [json.loads(line[len(PREFIX):]) for line in proc.stdout.splitlines()
               if line.startswith(PREFIX)]
        results += got
        if proc.returncode:
            results.append(dict(what=f"{side} process", side="error",
                                error=f"exit {proc.returncode}: {proc.stderr[-1500:]}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results, args.tiny))
    return 0


if __name__ == "__main__":
    sys.exit(main())
