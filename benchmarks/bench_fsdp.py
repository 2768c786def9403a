"""FSDP scaling: training throughput over 2 GPUs vs 1 GPU, same process, same step (issue 5).

    python benchmarks/bench_fsdp.py                 # 2B shape; 1 GPU, then FSDP over 2 (goal >= 1.9x)
    python benchmarks/bench_fsdp.py --per-device-batch 4,6 --remat dots,full
    python benchmarks/bench_fsdp.py --tiny          # CPU smoke test on 2 fake devices

Shape: hidden 2048, intermediate 16384, 16 layers, 16 heads, vocab 150272, seq 2048 (the 2B shape
of benchmarks/bench_train.py). Step: jais2_jax.training.step's (float32 params, bf16 compute, chunked
float32 loss, clipping + AdamW, state donated), jitted with the shardings of jais2_jax.parallel.sharding on
a (data=1, fsdp=N, tensor=1) mesh. Weak scaling: each device gets the same per-device batch, so
N devices process N times the tokens per step; speed-up = tok/s(N) / tok/s(1).

Each configuration is warmed up (compilation), then timed step by step with block_until_ready;
the median is reported. The compiled N-device step's collectives are counted (FSDP should
all-gather weights and reduce-scatter gradients). Prints one JSON line per measurement, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runs from a checkout without install
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from bench_train import SHAPES, model_config  # noqa: E402  (one definition of the 2B shape)

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def emit(**kw):
    print(json.dumps(kw), flush=True)


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def _collectives(hlo: str) -> dict:
    # Count instructions ("= all-gather(" or async "all-gather-start("), not metadata mentions.
    return {c: hlo.count(f" {c}(") + hlo.count(f" {c}-start(") for c in COLLECTIVES
            if f" {c}(" in hlo or f" {c}-start(" in hlo}


def measure(config, seq, n_devices, per_device_batch, remat, args):
    import jax
    import numpy as np

    from jais2_jax.parallel import sharding

    from jais2_jax.training.program import build_train_program
    from jais2_jax.training.step import flops_per_token
    from jais2_jax.training.run_config import RunConfig

    batch = per_device_batch * n_devices
    devices = jax.devices()[:n_devices]
    mesh = sharding.make_mesh((1, n_devices, 1), devices=devices)
    run = RunConfig(model="", data="", output_dir="", seq_len=seq, batch_size=batch,
                    loss_chunk=args.loss_chunk, dtype="float32" if args.tiny else "bfloat16",
                    param_dtype="float32", remat_policy=remat, warmup_steps=10, total_steps=1000)
    program = build_train_program(config, run, mesh)  # what `jais2 train` runs

    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (batch, seq + 1)).astype(np.int32)
    data = jax.device_put({"input_ids": ids[:, :-1], "targets": ids[:, 1:],
                           "loss_mask": np.ones((batch, seq), np.float32)},
                          program.batch_sharding)
    with sharding.use_mesh(mesh):
        state = program.init_state(jax.random.PRNGKey(0))  # created in its shards
        compiled = program.train_step.lower(state, data).compile()
        collectives = _collectives(compiled.as_text()) if n_devices > 1 else {}
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            state, metrics = compiled(state, data)
        jax.block_until_ready(metrics)
        warm_s = time.perf_counter() - t0
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            state, metrics = compiled(state, data)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
    step_s = _median(times)
    tok_s = batch * seq / step_s
    # Per-device bytes XLA planned for this step (arguments + outputs - donated + temporaries);
    # the allocator's peak would mix in earlier configurations of this process.
    ma = compiled.memory_analysis()
    planned = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
               + ma.temp_size_in_bytes) if ma is not None else 0
    return dict(devices=n_devices, batch=batch, remat=remat, step_s=step_s, tok_s=tok_s,
                tflops_per_device=flops_per_token(config, seq) * tok_s / n_devices / 1e12,
                loss=float(metrics["loss"]), warmup_s=warm_s, xla_gb=planned / 1e9,
                collectives=collectives)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape on 2 fake CPU devices")
    p.add_argument("--devices", type=int, default=2, help="FSDP width compared with 1 device")
    p.add_argument("--per-device-batch", default=None, help="comma-separated (default 6)")
    p.add_argument("--remat", default="dots", help="remat policies, comma-separated")
    p.add_argument("--loss-chunk", type=int, default=512)
    p.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--no-latency-hiding", dest="latency_hiding", action="store_false",
                   help="leave out --xla_gpu_enable_latency_hiding_scheduler=true")
    args = p.parse_args()
    shape = "tiny" if args.tiny else "2b"
    if args.tiny:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
        args.loss_chunk = min(args.loss_chunk, SHAPES["tiny"]["seq"])
    elif args.latency_hiding:
        # Overlap FSDP's weight gathers and gradient reductions with compute (same flag for the
        # 1-GPU baseline, where it has nothing to overlap).
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_gpu_enable_latency_hiding_scheduler=true")
    import jax
    if len(jax.devices()) < args.devices:
        sys.exit(f"need {args.devices} devices, found {len(jax.devices())}")
    emit(what="device", name=jax.devices()[0].device_kind, count=len(jax.devices()),
         jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""))
    config, seq = model_config(shape), SHAPES[shape]["seq"]
    rows = []
    for remat in args.remat.split(","):
        for pdb in map(int, (args.per_device_batch or ("2" if args.tiny else "6")).split(",")):
            for n in (1, args.devices):
                try:
                    row = measure(config, seq, n, pdb, remat, args)
                except Exception as e:  # noqa: BLE001  (OOM is an XlaRuntimeError; keep going)
                    oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
                    row = dict(devices=n, batch=pdb * n, remat=remat,
                               error="OOM" if oom else f"{type(e).__name__}: {str(e)[:300]}")
                finally:
                    jax.clear_caches()
                emit(**row)
                rows.append(row)
    _table(rows, shape, args)


def _table(rows, shape, args):
    s = SHAPES[shape]
    print(f"\nFSDP train step, {shape} shape (hidden {s['hidden_size']}, {s['num_hidden_layers']} "
          f"layers, vocab {s['vocab_size']}, seq {s['seq']}); median of {args.steps} steps")
    print(f"{'devices':>7}{'batch':>6}{'remat':>8}{'tok/s':>10}{'TFLOP/s/dev':>12}{'step ms':>9}"
          f"{'XLA GB':>9}  speed-up / collectives")
    base = {}
    for r in rows:
        if "tok_s" not in r:
            print(f"{r['devices']:>7}{r['batch']:>6}{r['remat']:>8}  {r['error']}")
            continue
        key = (r["remat"], r["batch"] // r["devices"])
        note = ""
        if r["devices"] == 1:
            base[key] = r["tok_s"]
        elif key in base:
            note = f"{r['tok_s'] / base[key]:.2f}x (goal >= {0.95 * r['devices']:.1f}x)  "
        note += " ".join(f"{k}:{v}" for k, v in r["collectives"].items())
        print(f"{r['devices']:>7}{r['batch']:>6}{r['remat']:>8}{r['tok_s']:>10.0f}"
              f"{r['tflops_per_device']:>12.1f}{1e3 * r['step_s']:>9.1f}{r['xla_gb']:>9.2f}  {note}")


if __name__ == "__main__":
    main()
