"""Where the time goes: trace the 2B train step and the 8B prefill with jax.profiler, sum the GPU
kernel time by kernel and by kind (GEMM, attention, fusion, copy, ...), print a short table.

    python benchmarks/profile_gpu.py --out $OUT            # GPU: train step and prefill
    python benchmarks/profile_gpu.py --what train --batch 16 --remat dots_no_batch
    python benchmarks/profile_gpu.py --what lora --batch 8 --remat dots   # the 8B LoRA step
    python benchmarks/profile_gpu.py --tiny                # CPU: checks the script

The trace is jax.profiler's Perfetto JSON (`perfetto_trace.json.gz`, plain Chrome trace events);
GPU kernels sit on the device process's stream threads. Kernel time is summed over the traced
calls and divided by their number; the gap to the wall time per call is host/launch time.
The compiled HLO of each program (train step, prefill, decode loop) is written beside the summary
so fusion names can be looked up.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

KINDS = [  # first match wins; lower-case substrings of kernel names
    ("attention", ("flash", "fmha", "cudnn", "sdpa", "attention")),
    ("gemm", ("gemm", "xmma", "cutlass", "cublas", "nvjet", "sm90_", "matmul", "dot")),
    ("reduce", ("reduce", "reduction")),
    ("copy/transpose", ("copy", "transpose", "memcpy", "memset", "dynamic_update_slice",
                        "dynamic-update-slice", "concatenate")),
    ("fusion/elementwise", ("fusion", "loop_", "input_", "convert", "multiply", "add")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def summarize(trace_dir: str, calls: int, wall_s: float, top: int = 25) -> str:
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        return f"no perfetto trace under {trace_dir}"
    with gzip.open(sorted(paths)[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    gpu_pids = {p for p, n in procs.items() if "gpu" in n.lower() or "device" in n.lower()}
    # Stream threads hold kernels; "XLA Ops"/"XLA Modules"/name-scope lines would double count.
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in gpu_pids:
            continue
        by_thread[threads.get((e["pid"], e["tid"]), str(e["tid"]))].append(e)
    lines = ["threads on the device: " + ", ".join(
        f"{t} ({len(v)} events, {sum(x.get('dur', 0) for x in v) / 1e3 / calls:.2f} ms/call)"
        for t, v in sorted(by_thread.items()))]
    streams = {t: v for t, v in by_thread.items() if "stream" in t.lower()} or by_thread
    per_name, per_kind = collections.Counter(), collections.Counter()
    count = collections.Counter()
    for v in streams.values():
        for e in v:
            per_name[e["name"]] += e.get("dur", 0)
            per_kind[kind_of(e["name"])] += e.get("dur", 0)
            count[e["name"]] += 1
    total = sum(per_name.values())
    lines.append(f"wall {wall_s / calls * 1e3:.2f} ms/call; kernel time {total / 1e3 / calls:.2f} "
                 f"ms/call ({len(per_name)} distinct kernels)")
    lines.append(f"{'kind':<22}{'ms/call':>10}{'share':>8}")
    for k, d in per_kind.most_common():
        lines.append(f"{k:<22}{d / 1e3 / calls:>10.2f}{d / max(total, 1):>8.1%}")
    lines.append(f"\n{'top kernels':<90}{'ms/call':>9}{'n/call':>8}{'share':>8}")
    for n, d in per_name.most_common(top):
        lines.append(f"{n[:88]:<90}{d / 1e3 / calls:>9.2f}{count[n] / calls:>8.1f}"
                     f"{d / max(total, 1):>8.1%}")
    return "\n".join(lines)


def write_hlo(out: str, name: str, lowered) -> None:
    """The compiled HLO beside the trace, so kernel names (fusion.N) can be looked up."""
    with gzip.open(os.path.join(out, f"{name}.hlo.txt.gz"), "wt") as f:
        f.write(lowered.compile().as_text())


def trace(fn, calls: int, out: str, label: str):
    import jax
    jax.block_until_ready(fn())  # warm (compiled already by the caller's warm-up)
    d = os.path.join(out, f"trace_{label}_{time.strftime('%H%M%S')}")
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    t = time.perf_counter()
    for _ in range(calls):
        r = fn()
        jax.block_until_ready(r)
    wall = time.perf_counter() - t
    jax.profiler.stop_trace()
    for path in glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True):
        shutil.copy(path, d + ".json.gz")  # beside the folder: nested folders may not travel back
    return d, wall


def profile_train(args):
    import jax
    import bench_train
    from jais2_jax.parallel.sharding import make_mesh, use_mesh
    from jais2_jax.training.program import build_train_program

    shape = "tiny" if args.tiny else "2b"
    config = bench_train.model_config(shape)
    seq = bench_train.SHAPES[shape]["seq"]
    batch = 2 if args.tiny else args.batch
    mesh = make_mesh("fsdp", devices=jax.devices()[:1])
    run = bench_train.run_config(shape, batch, args.remat, loss_chunk=args.loss_chunk,
                                 scan_layers=not args.unrolled, overrides=args.set)
    if args.loss == "checkpointed":  # the earlier loss: backward recomputes each chunk's logits
        from jais2_jax.training import step as training

        def checkpointed(model, params, batch, *, chunk, z_loss):
            ce, z = training.loss_sums(model, params, batch, chunk=chunk)
            return ce + z_loss * z, (ce, z)
        training.train_loss_sums = checkpointed
    program = build_train_program(config, run, mesh)
    data = bench_train.random_batch(config, batch, seq)
    box = {}
    with use_mesh(mesh):
        box["state"] = program.init_state(jax.random.PRNGKey(0))
        write_hlo(args.out, "train_step", program.train_step.lower(box["state"], data))

        def step():
            box["state"], metrics = program.train_step(box["state"], data)
            return metrics
        for _ in range(2):
            jax.block_until_ready(step())
        d, wall = trace(step, args.calls, args.out, "train")
    return (f"== train step: 2B shape, batch {batch}, seq {seq}, remat {args.remat}, "
            f"{'unrolled' if args.unrolled else 'scanned'} layers, {args.loss} loss, "
            f"tok/s {batch * seq * args.calls / wall:,.0f}\n" + summarize(d, args.calls, wall, args.top))


def profile_lora(args):
    """The 8B LoRA train step of bench_lora.py (rank 16 on q/k/v/o/up/down, seq 2048)."""
    import jax
    import bench_lora
    from jais2_jax.parallel.sharding import make_mesh, use_mesh
    from jais2_jax.training.program import build_train_program

    shape = "tiny" if args.tiny else "8b"
    config = bench_lora.model_config(shape)
    seq = bench_lora.SHAPES[shape]["seq"]
    batch = 2 if args.tiny else args.batch
    mesh = make_mesh("fsdp", devices=jax.devices()[:1])
    run = bench_lora.run_config(shape, batch, args.remat, None, loss_chunk=args.loss_chunk)
    if args.set:
        import dataclasses
        run = dataclasses.replace(run, **{k: type(getattr(run, k))(v) for k, v in
                                          (kv.split("=", 1) for kv in args.set)})
    program = build_train_program(config, run, mesh)
    data = bench_lora.random_batch(config, batch, seq)
    box = {}
    with use_mesh(mesh):
        base = bench_lora.synthetic_base(program)
        box["state"] = program.init_state(jax.random.PRNGKey(0))
        write_hlo(args.out, "lora_step", program.train_step.lower(box["state"], data, base))

        def step():
            box["state"], metrics = program.train_step(box["state"], data, base)
            return metrics
        for _ in range(2):
            jax.block_until_ready(step())
        d, wall = trace(step, args.calls, args.out, "lora")
    return (f"== LoRA step: 8B shape, batch {batch}, seq {seq}, remat {args.remat}, "
            f"tok/s {batch * seq * args.calls / wall:,.0f}\n"
            + summarize(d, args.calls, wall, args.top))


def profile_prefill(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import bench_generate
    from jais2_jax import Jais2Config, init_cache
    from jais2_jax.inference.generate import prefill
    from jais2_jax.model.options import as_dtype

    p = bench_generate.plan(args.tiny)
    dtype = as_dtype(p["dtype"])
    config = Jais2Config(**p["shape"], bos_token_id=0, eos_token_id=1, pad_token_id=0)
    model, params = bench_generate.random_params(config, dtype, fuse_qkv=True)
    ids = jnp.asarray(np.random.RandomState(0).randint(2, config.vocab_size, (1, p["prefill"])),
                      jnp.int32)
    mask = jnp.ones_like(ids)

    def once():
        cache = init_cache(config, 1, p["prefill"], dtype=dtype, per_layer=True)
        return prefill(model, params, ids, mask, cache)
    write_hlo(args.out, "prefill", prefill.lower(
        model, params, ids, mask, init_cache(config, 1, p["prefill"], dtype=dtype, per_layer=True)))
    for _ in range(2):
        jax.block_until_ready(once())
    d, wall = trace(once, args.calls, args.out, "prefill")
    return f"== prefill 1 x {p['prefill']}\n" + summarize(d, args.calls, wall)


def profile_decode(args):
    """The on-device decode loop at each batch of --decode-batches: kernels per decode step."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import bench_generate
    from jais2_jax import Jais2Config, init_cache
    from jais2_jax.inference.generate import decode_loop, prefill
    from jais2_jax.model.options import as_dtype
    from jais2_jax.inference.sampling import Sampler

    p = bench_generate.plan(args.tiny)
    dtype = as_dtype(p["dtype"])
    config = Jais2Config(**p["shape"], bos_token_id=0, eos_token_id=1, pad_token_id=0)
    model, params = bench_generate.random_params(config, dtype, fuse_qkv=not args.unfused_qkv)
    if args.attention:
        model = model.with_options(attention_impl=args.attention)
    reports, new = [], args.decode_steps
    for batch in map(int, args.decode_batches.split(",")):
        ids = jnp.asarray(np.random.RandomState(0).randint(2, config.vocab_size,
                                                           (batch, p["prompt"])), jnp.int32)

        def once():
            cache = init_cache(config, batch, p["prompt"] + new + 128 - (p["prompt"] + new) % 128,
                               dtype=dtype, per_layer=True)
            logits, cache = prefill(model, params, ids, jnp.ones_like(ids), cache)
            return decode_loop(model, params, logits, cache, None, max_new_tokens=new,
                                sampler=Sampler(), eos_ids=(), pad_id=0, callback=None)[0]
        cache = init_cache(config, batch, p["prompt"] + new + 128 - (p["prompt"] + new) % 128,
                           dtype=dtype, per_layer=True)
        logits = jnp.zeros((batch, config.vocab_size), jnp.float32)
        write_hlo(args.out, f"decode_loop_b{batch}", decode_loop.lower(
            model, params, logits, cache, None, max_new_tokens=new, sampler=Sampler(), eos_ids=(),
            pad_id=0, callback=None))
        del cache
        for _ in range(2):
            jax.block_until_ready(once())
        t = time.perf_counter()
        jax.block_until_ready(once())
        wall = time.perf_counter() - t
        d, _ = trace(once, 1, args.out, f"decode_b{batch}")
        reports.append(f"== decode batch {batch}, {new} steps (+ its prefill): "
                       f"{wall / new * 1e3:.2f} ms/step incl. prefill; per step below\n"
                       + summarize(d, new, wall))
    return "\n\n".join(reports)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--what", default="train,prefill")
    p.add_argument("--out", default="/tmp/jais2_profile")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--remat", default="dots_no_batch")
    p.add_argument("--loss-chunk", type=int, default=512)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--unrolled", action="store_true", help="train step with scan_layers=False")
    p.add_argument("--loss", choices=("fused", "checkpointed"), default="fused")
    p.add_argument("--decode-batches", default="1,64")
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--unfused-qkv", action="store_true")
    p.add_argument("--attention", choices=("xla", "cudnn"), default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="train step: override the RunConfig (as bench_train.py --set)")
    p.add_argument("--top", type=int, default=25, help="kernels listed by time")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    reports = []
    for what in args.what.split(","):
        reports.append({"train": profile_train, "lora": profile_lora, "prefill": profile_prefill,
                        "decode": profile_decode}[what](args))
        print(reports[-1], flush=True)
    with open(os.path.join(args.out, "profile.txt"), "w") as f:
        f.write("\n\n".join(reports) + "\n")


if __name__ == "__main__":
    main()
