"""Training throughput: this project's jitted train step vs transformers (PyTorch), same shapes,
same run, one FLOPs formula.

    python benchmarks/bench_train.py                       # 2B shape on one GPU, sweeps batch x remat
    python benchmarks/bench_train.py --batch 6,8,12 --remat dots,dots_no_batch,full
    python benchmarks/bench_train.py --tiny                # CPU smoke test of the whole script

Shape (issue 6): hidden 2048, intermediate 16384, 16 layers, 16 heads, vocab 150272, seq 2048.
Ours: float32 params, bf16 compute, the chunked float32 loss of jais2_jax.training.step, AdamW + clipping,
state donated. transformers: float32 params, bf16 autocast, fused AdamW, `labels=` loss (as
/work/shared/anchors/hf_torch_bench.py measured it).

FLOPs per token for both (jais2_jax.training.flops_per_token):
    6 * matmul_params + 6 * layers * seq * heads * head_dim
(matmul params: q/k/v/o, up/down and lm_head kernels; no embedding lookup; causal attention.)

Each side runs in its own subprocess (a fresh GPU each); each configuration is warmed up, then
timed step by step with block_until_ready / CUDA events; the median is reported. A configuration
that runs out of memory is reported as OOM and the sweep goes on. Prints one JSON line per
measurement, then a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runs from a checkout without install

SHAPES = {
    "2b": dict(vocab_size=150272, hidden_size=2048, intermediate_size=16384, num_hidden_layers=16,
               num_attention_heads=16, num_key_value_heads=16, seq=2048),
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, seq=128),
}


def model_config(shape: str):
    from jais2_jax import Jais2Config
    kw = {k: v for k, v in SHAPES[shape].items() if k != "seq"}
    return Jais2Config(**kw, max_position_embeddings=SHAPES[shape]["seq"], bos_token_id=0,
                       eos_token_id=1, rope_parameters={"rope_type": "default", "rope_theta": 5e5})


def run_config(shape: str, batch: int, remat: str, *, loss_chunk: int, scan_layers: bool = True,
               overrides=()):
    """The RunConfig both benchmark scripts time: float32 params, bf16 compute (float32 on tiny);
    `overrides` ("KEY=VALUE" strings) parsed and checked as `jais2 train --set` does."""
    from jais2_jax.training.run_config import RunConfig
    run = RunConfig(model="", data="", output_dir="", seq_len=SHAPES[shape]["seq"], batch_size=batch,
                    loss_chunk=loss_chunk, dtype="float32" if shape == "tiny" else "bfloat16",
                    param_dtype="float32", remat_policy=remat, warmup_steps=10, total_steps=1000,
                    scan_layers=scan_layers)
    return RunConfig.from_dict(dataclasses.asdict(run), list(overrides)) if overrides else run


def random_batch(config, batch: int, seq: int) -> dict:
    """Random token ids (never zeros), next-token targets, every position counted."""
    import jax.numpy as jnp
    import numpy as np
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1)),
                      jnp.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
            "loss_mask": jnp.ones((batch, seq), jnp.float32)}


def emit(**kw):
    print(json.dumps(kw), flush=True)


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


# ------------------------------------------------------------------------------------------ ours
def run_jax(args):
    import jax

    from jais2_jax.parallel.sharding import make_mesh, use_mesh
    from jais2_jax.training.program import build_train_program, clear_cache
    from jais2_jax.training.step import flops_per_token

    config = model_config(args.shape)
    seq = SHAPES[args.shape]["seq"]
    mesh = make_mesh("fsdp", devices=jax.devices()[:1])
    emit(side="jax", what="device", name=jax.devices()[0].device_kind, jax=jax.__version__,
         overrides=args.set, xla_flags=os.environ.get("XLA_FLAGS", ""))
    start = time.perf_counter()
    for variant in args.remat.split(","):
        remat, _, layout = variant.partition(":")  # "dots_no_batch:unrolled" -> scan_layers=False
        for batch in map(int, args.batch.split(",")):
            if time.perf_counter() - start > args.budget_s:
                emit(side="jax", batch=batch, remat=variant, skipped="time budget")
                continue
            run = run_config(args.shape, batch, remat, loss_chunk=args.loss_chunk,
                             scan_layers=layout != "unrolled", overrides=args.set)
            try:
                program = build_train_program(config, run, mesh)
                data = random_batch(config, batch, seq)
                with use_mesh(mesh):
                    state = program.init_state(jax.random.PRNGKey(0))
                    compile_start = time.perf_counter()
                    for _ in range(args.warmup):
                        state, metrics = program.train_step(state, data)
                    jax.block_until_ready(metrics)
                    warm_s = time.perf_counter() - compile_start
                    times = []
                    for _ in range(args.steps):
                        t = time.perf_counter()
                        state, metrics = program.train_step(state, data)
                        jax.block_until_ready(metrics)
                        times.append(time.perf_counter() - t)
                step_s = _median(times)
                tok_s = batch * seq / step_s
                stats = jax.devices()[0].memory_stats() or {}
                emit(side="jax", batch=batch, remat=variant, step_s=step_s, tok_s=tok_s,
                     tflops=flops_per_token(config, seq) * tok_s / 1e12,
                     loss=float(metrics["loss"]), warmup_s=warm_s,
                     peak_gb=stats.get("peak_bytes_in_use", 0) / 1e9)
            except Exception as e:  # noqa: BLE001  (OOM is an XlaRuntimeError; keep sweeping)
                oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
                emit(side="jax", batch=batch, remat=variant,
                     error="OOM" if oom else f"{type(e).__name__}: {str(e)[:300]}")
            finally:
                state = metrics = None
                clear_cache()
                jax.clear_caches()


# ---------------------------------------------------------------------------------- transformers
def run_hf(args):
    import torch
    import transformers
    from transformers import Jais2Config, Jais2ForCausalLM

    from jais2_jax.training.step import flops_per_token

    cuda = torch.cuda.is_available() and not args.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    emit(side="hf", what="device", name=torch.cuda.get_device_name(0) if cuda else "cpu",
         torch=torch.__version__, transformers=transformers.__version__)
    shape = SHAPES[args.shape]
    seq = shape["seq"]
    cfg = Jais2Config(**{k: v for k, v in shape.items() if k != "seq"},
                      max_position_embeddings=seq, bos_token_id=0, eos_token_id=1,
                      pad_token_id=None, rope_theta=5e5)
    ours = model_config(args.shape)
    for batch in map(int, args.hf_batch.split(",")):
        model = opt = None
        try:
            torch.manual_seed(0)
            with dev:
                model = Jais2ForCausalLM(cfg)
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
            ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=dev)

            def step():
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                    loss = model(ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            for _ in range(args.warmup):
                step()
            times = []
            for _ in range(args.steps):
                if cuda:
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize()
                    s.record()
                    loss = step()
                    e.record()
                    torch.cuda.synchronize()
                    times.append(s.elapsed_time(e) / 1e3)
                else:
                    t = time.perf_counter()
                    loss = step()
                    times.append(time.perf_counter() - t)
            step_s = _median(times)
            tok_s = batch * seq / step_s
            emit(side="hf", batch=batch, remat="-", step_s=step_s, tok_s=tok_s,
                 tflops=flops_per_token(ours, seq) * tok_s / 1e12, loss=float(loss),
                 peak_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0)
        except torch.OutOfMemoryError:
            emit(side="hf", batch=batch, remat="-", error="OOM")
        finally:
            del model, opt
            if cuda:
                torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ main
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape on the CPU (smoke test)")
    p.add_argument("--batch", default=None, help="our batch sizes, comma-separated (default 6,8,12)")
    p.add_argument("--remat", default=None,
                   help="remat policies: none, dots, dots_no_batch, full (default dots,dots_no_batch); "
                        "a ':unrolled' suffix runs the layers unrolled (run.scan_layers=False)")
    p.add_argument("--hf-batch", default=None, help="transformers batch sizes (default 2); '' skips")
    p.add_argument("--loss-chunk", type=int, default=512, help="sequence chunk of the loss")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation) first")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip our remaining configurations after this many seconds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override our RunConfig, e.g. --set logits_dot_in_fp32=false "
                        "--set grad_accum_steps=2 (batch stays the optimizer step's rows)")
    p.add_argument("--side", choices=("jax", "hf"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.shape = "tiny" if args.tiny else "2b"
    args.batch = args.batch or ("2,4" if args.tiny else "6,8,12")
    args.remat = args.remat or ("none,dots" if args.tiny else "dots,dots_no_batch")
    args.hf_batch = ("2" if args.hf_batch is None else args.hf_batch)
    if args.tiny:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.side == "jax":
        return run_jax(args)
    if args.side == "hf":
        return run_hf(args)

    rows = []
    sides = (["hf"] if args.hf_batch else []) + ["jax"]
    for side in sides:
        cmd = [sys.executable, os.path.abspath(__file__), "--side", side] + sys.argv[1:]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in proc.stdout.splitlines():
            print(line, flush=True)
            if line.startswith("{"):
                rows.append(json.loads(line))
        if proc.returncode:
            print(f"[{side}] exited {proc.returncode}:\n{proc.stderr[-3000:]}", file=sys.stderr)
    _table(rows, args)


def _table(rows, args):
    shape = SHAPES[args.shape]
    print(f"\ntrain step, {args.shape} shape (hidden {shape['hidden_size']}, "
          f"{shape['num_hidden_layers']} layers, vocab {shape['vocab_size']}, seq {shape['seq']}); "
          f"median of {args.steps} steps")
    for r in rows:
        if r.get("what") == "device":
            print(f"  {r['side']}: {r['name']}")
    print(f"{'impl':<14}{'batch':>6}{'remat':>24}{'tok/s':>10}{'TFLOP/s':>9}{'step ms':>9}"
          f"{'peak GB':>9}  note")
    best_hf = max((r["tok_s"] for r in rows if r.get("side") == "hf" and "tok_s" in r), default=None)
    for r in rows:
        if "batch" not in r:
            continue
        impl = "transformers" if r["side"] == "hf" else "jais2-jax"
        if "tok_s" in r:
            note = f"{r['tok_s'] / best_hf:.2f}x HF" if best_hf and r["side"] == "jax" else ""
            print(f"{impl:<14}{r['batch']:>6}{r['remat']:>24}{r['tok_s']:>10.0f}{r['tflops']:>9.1f}"
                  f"{1e3 * r['step_s']:>9.1f}{r['peak_gb']:>9.1f}  {note}")
        else:
            print(f"{impl:<14}{r['batch']:>6}{r['remat']:>24}{'':>37}  "
                  f"{r.get('error') or r.get('skipped')}")


if __name__ == "__main__":
    main()
