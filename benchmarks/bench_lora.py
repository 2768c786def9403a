"""LoRA / QLoRA training throughput: this project's LoRA train step vs transformers + PEFT, same
shapes, same run, one FLOPs formula.

    python benchmarks/bench_lora.py                        # 8B shape, one GPU: ours (batch x remat)
                                                           # and transformers + PEFT
    python benchmarks/bench_lora.py --batch 8,12 --remat dots,dots_no_mlp,full
    python benchmarks/bench_lora.py --shape 70b --quantize int8   # QLoRA 70B, ours only
    python benchmarks/bench_lora.py --shape 70b --quantize int8 --compile-only   # any machine:
                                                           # the compiled step's memory, no run
    python benchmarks/bench_lora.py --tiny                 # CPU smoke test of the whole script

LoRA rank 16, alpha 32, dropout 0, on q/k/v/o/up/down, seq 2048. Ours: the frozen base in bf16
(`--quantize int8`: QLoRA, int8 projections and lm_head + per-channel scales, the embedding table
int8 + per-row scales), float32 adapters and AdamW,
bf16 compute, the step of `jais2_jax.training.program` (adapters only differentiated; the base a
separate argument). The base's values are synthetic (a hash of the index, no random-number
temporaries: the 70B base fills the card); speed does not depend on them. transformers + PEFT as
`/work/shared/anchors/hf_peft_lora_bench.py` measured it: the model in bf16, PEFT LoRA with the
same settings, torch AdamW over the adapters, `labels=` loss; batch 2 without gradient
checkpointing and batch 8 with it (`--hf-batch 2,8:gc`).

FLOPs per token for both (`training.lora.lora_flops_per_token`): 4 x base matmul params (forward
and the activations' gradient; no weight gradients) + causal attention (6 x layers x seq x heads x
head_dim) + 6 x adapter params.

Each side runs in its own subprocess; each configuration is warmed up (compilation), then timed
step by step with block_until_ready / CUDA events; the median is reported, with the peak bytes of
jax's memory stats (`peak_bytes_in_use`) or torch's `max_memory_allocated`. Our step is compiled
once ahead of time and its `memory_analysis()` printed (arguments, temporaries, the peak they
imply) with whether the measured peak fits one H100 (79.5e9 bytes for XLA at the default
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 of 80 GiB; `--compile-only` prints the analysis alone, on
any backend, the CPU's without allocating anything). A configuration that
runs out of memory is reported as OOM and the sweep goes on. One JSON line per measurement
(`--json FILE` also writes them to FILE), then a table. Our side lets XLA take 95% of the GPU's
memory (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runs from a checkout without install

SHAPES = {
    "8b": dict(vocab_size=150272, hidden_size=3328, intermediate_size=26624, num_hidden_layers=32,
               num_attention_heads=26, num_key_value_heads=26, head_dim=128, seq=2048),
    "70b": dict(vocab_size=150272, hidden_size=7168, intermediate_size=57344,
                num_hidden_layers=68, num_attention_heads=56, num_key_value_heads=56,
                head_dim=128, seq=2048),
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, head_dim=16, seq=128),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
# An estimate of XLA's pool on an H100 at XLA_PYTHON_CLIENT_MEM_FRACTION=0.95, for other cards; on
# an H100 its own `bytes_limit` is used (2026-12-06: 70B QLoRA with an 80.77 GB peak ran there).
H100_XLA_BYTES = 79.5e9


def model_config(shape: str):
    from jais2_jax import Jais2Config
    kw = {k: v for k, v in SHAPES[shape].items() if k != "seq"}
    return Jais2Config(**kw, max_position_embeddings=SHAPES[shape]["seq"], bos_token_id=0,
                       eos_token_id=1, rope_parameters={"rope_type": "default", "rope_theta": 5e5})


def run_config(shape: str, batch: int, remat: str, quantize, *, loss_chunk: int,
               param_dtype: str = "float32", mu_dtype: str | None = None):
    """`remat` is a policy name, with ":unrolled" for `scan_layers=False` (as bench_train.py)."""
    from jais2_jax.training.run_config import RunConfig
    tiny = shape == "tiny"
    remat, _, layout = remat.partition(":")
    if layout not in ("", "unrolled"):
        raise ValueError(f"remat {remat}:{layout}: the only suffix is ':unrolled'")
    return RunConfig(model="", data="", output_dir="", seq_len=SHAPES[shape]["seq"],
                     scan_layers=layout != "unrolled", batch_size=batch, loss_chunk=min(loss_chunk, SHAPES[shape]["seq"]),
                     dtype="float32" if tiny else "bfloat16", param_dtype=param_dtype,
                     remat_policy=remat, warmup_steps=10, total_steps=1000, lr=1e-4,
                     lora={"rank": RANK, "alpha": ALPHA, "dropout": 0.0,
                           "target_modules": TARGETS, "base_quantization": quantize,
                           "mu_dtype": mu_dtype})


def random_batch(config, batch: int, seq: int) -> dict:
    import jax.numpy as jnp
    import numpy as np
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1)),
                      jnp.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
            "loss_mask": jnp.ones((batch, seq), jnp.float32)}


def synthetic_base(program):
    """The frozen base in its shardings, filled by a hash of each element's index (fused by XLA:
    no temporaries beside the outputs): int8 values in [-127, 127], float weights ~ +-0.02, norm
    scales 1, biases 0, per-channel scales 0.02 / 127."""
    import jax
    import jax.numpy as jnp

    def fill(path, a):
        name = path[-1].key
        if name == "scale" and a.dtype == jnp.float32 and "norm" not in jax.tree_util.keystr(path):
            parent = functools.reduce(lambda t, k: t[k.key], path[:-1], program.abstract_base)
            values = parent.get("kernel", parent.get("embedding"))  # a projection or the table
            nf4 = values.dtype == jnp.uint4  # the block's absmax; int8: absmax / 127
            return jnp.full(a.shape, 0.02 if nf4 else 0.02 / 127, a.dtype)
        if name == "scale":
            return jnp.ones(a.shape, a.dtype)
        if name == "bias":
            return jnp.zeros(a.shape, a.dtype)
        idx = jnp.zeros(a.shape, jnp.uint32)
        for d in range(len(a.shape)):  # a running index, hashed
            idx = idx * jnp.uint32(a.shape[d]) + jax.lax.broadcasted_iota(jnp.uint32, a.shape, d)
        h = (idx * jnp.uint32(2654435761)) >> jnp.uint32(16)
        if a.dtype == jnp.int8:
            return ((h % jnp.uint32(255)).astype(jnp.int32) - 127).astype(jnp.int8)
        if a.dtype == jnp.uint4:  # nf4 codes
            return (h % jnp.uint32(16)).astype(jnp.uint4)
        return (((h % jnp.uint32(2001)).astype(jnp.float32) - 1000.0) * 2e-5).astype(a.dtype)

    return jax.jit(lambda: jax.tree_util.tree_map_with_path(fill, program.abstract_base),
                   out_shardings=program.base_shardings)()


def emit(out, **kw):
    line = json.dumps(kw)
    print(line, flush=True)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


# ------------------------------------------------------------------------------------------ ours
def run_jax(args):
    import jax

    from jais2_jax.parallel.sharding import make_mesh, use_mesh
    from jais2_jax.training.lora import adapter_count, lora_flops_per_token
    from jais2_jax.training.program import build_train_program, clear_cache

    config = model_config(args.shape)
    seq = SHAPES[args.shape]["seq"]
    mesh = make_mesh("fsdp", devices=jax.devices()[:1])
    emit(args.json, side="jax", what="device", name=jax.devices()[0].device_kind,
         jax=jax.__version__, quantize=args.quantize, mu_dtype=args.mu_dtype,
         mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", ""))
    base = None
    start = time.perf_counter()
    for remat in args.remat.split(","):
        for batch in map(int, args.batch.split(",")):
            if time.perf_counter() - start > args.budget_s:
                emit(args.json, side="jax", batch=batch, remat=remat, skipped="time budget")
                continue
            state = metrics = None
            try:  # a remat policy this checkout lacks is reported like an OOM: the sweep goes on
                run = run_config(args.shape, batch, remat, args.quantize,
                                 loss_chunk=args.loss_chunk, param_dtype=args.param_dtype,
                                 mu_dtype=args.mu_dtype)
                program = build_train_program(config, run, mesh)
                data = random_batch(config, batch, seq)
                compile_start = time.perf_counter()
                with use_mesh(mesh):  # from abstract inputs: nothing allocated
                    step = program.train_step.lower(
                        program.abstract_state(),
                        {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=program.batch_sharding)
                         for k, v in data.items()},
                        program.abstract_base_sharded()).compile()
                mem = step.memory_analysis()
                need = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                        - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
                emit(args.json, side="jax", what="compiled", batch=batch, remat=remat,
                     backend=jax.default_backend(), compile_s=time.perf_counter() - compile_start,
                     argument_gb=mem.argument_size_in_bytes / 1e9,
                     temp_gb=mem.temp_size_in_bytes / 1e9,
                     output_gb=mem.output_size_in_bytes / 1e9,
                     alias_gb=mem.alias_size_in_bytes / 1e9, compiled_peak_gb=need / 1e9,
                     host_temp_gb=getattr(mem, "host_temp_size_in_bytes", 0) / 1e9)
                if args.compile_only:
                    continue
                with use_mesh(mesh):
                    if base is None:  # one base for the whole sweep (same tree every setting)
                        base = synthetic_base(program)
                        jax.block_until_ready(base)
                    state = program.init_state(jax.random.PRNGKey(0))
                    try:
                        state, metrics = step(state, data, base)
                    except ValueError as e:  # nf4: 4-bit arrays made by a jit may not carry the
                        if "layouts" not in str(e):  # packed layout the AOT step was compiled
                            raise  # for; jit then compiles for the layout they have
                        step = program.train_step
                        state, metrics = step(state, data, base)
                    for _ in range(args.warmup - 1):
                        state, metrics = step(state, data, base)
                    jax.block_until_ready(metrics)
                    warm_s = time.perf_counter() - compile_start
                    times = []
                    for _ in range(args.steps):
                        t = time.perf_counter()
                        state, metrics = step(state, data, base)
                        jax.block_until_ready(metrics)
                        times.append(time.perf_counter() - t)
                step_s = _median(times)
                tok_s = batch * seq / step_s
                stats = jax.devices()[0].memory_stats() or {}
                peak = stats.get("peak_bytes_in_use", 0)
                on_h100 = "H100" in jax.devices()[0].device_kind
                h100_limit = (on_h100 and stats.get("bytes_limit")) or H100_XLA_BYTES
                emit(args.json, side="jax", batch=batch, remat=remat, step_s=step_s, tok_s=tok_s,
                     tflops=lora_flops_per_token(config, seq, run.lora) * tok_s / 1e12,
                     loss=float(metrics["loss"]), warmup_s=warm_s,
                     adapters=adapter_count(config, run.lora), peak_gb=peak / 1e9,
                     bytes_limit_gb=stats.get("bytes_limit", 0) / 1e9,
                     fits_h100=bool(peak) and peak <= h100_limit)
            except Exception as e:  # noqa: BLE001  (OOM is an XlaRuntimeError; keep sweeping)
                oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
                emit(args.json, side="jax", batch=batch, remat=remat,
                     error="OOM" if oom else f"{type(e).__name__}: {str(e)[:1500]}")
            finally:
                state = metrics = None
                clear_cache()
                jax.clear_caches()


# --------------------------------------------------------------------------- transformers + PEFT
def run_hf(args):
    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import Jais2Config, Jais2ForCausalLM

    from jais2_jax.training.lora import lora_flops_per_token
    from jais2_jax.training.run_config import LoraConfig as OurLora

    cuda = torch.cuda.is_available() and not args.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    emit(args.json, side="hf", what="device",
         name=torch.cuda.get_device_name(0) if cuda else "cpu", torch=torch.__version__,
         transformers=transformers.__version__, peft=peft.__version__)
    shape = SHAPES[args.shape]
    seq = shape["seq"]
    cfg = Jais2Config(**{k: v for k, v in shape.items() if k != "seq"},
                      max_position_embeddings=seq, bos_token_id=0, eos_token_id=1,
                      pad_token_id=None)
    flops = lora_flops_per_token(model_config(args.shape), seq,
                                 OurLora(rank=RANK, alpha=ALPHA, target_modules=TARGETS))
    dtype = torch.bfloat16 if cuda else torch.float32
    for spec in args.hf_batch.split(","):
        batch_text, _, gc = spec.partition(":")
        batch, gc = int(batch_text), gc == "gc"
        model = opt = None
        try:
            torch.manual_seed(0)
            with dev:
                model = Jais2ForCausalLM(cfg).to(dtype)
            model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA,
                                                     target_modules=TARGETS, lora_dropout=0.0))
            if gc:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=dev)
            if cuda:
                torch.cuda.reset_peak_memory_stats()

            def step():
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            for _ in range(args.warmup):
                step()
            times = []
            for _ in range(args.steps):
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                loss = step()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            step_s = _median(times)
            tok_s = batch * seq / step_s
            emit(args.json, side="hf", batch=batch, remat="gc" if gc else "-", step_s=step_s,
                 tok_s=tok_s, tflops=flops * tok_s / 1e12, loss=float(loss),
                 peak_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0)
        except torch.OutOfMemoryError:
            emit(args.json, side="hf", batch=batch, remat="gc" if gc else "-", error="OOM")
        finally:
            del model, opt
            if cuda:
                torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ main
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape on the CPU (smoke test)")
    p.add_argument("--shape", choices=("8b", "70b"), default="8b")
    p.add_argument("--quantize", choices=("int8", "nf4"), default=None,
                   help="QLoRA: the frozen base's projections int8 or nf4 (ours only)")
    p.add_argument("--batch", default=None,
                   help="our batch sizes, comma-separated (default 8,16; 70b: 1,2)")
    p.add_argument("--remat", default=None,
                   help="remat policies (default dots,dots_no_mlp,full; 70b: full,dots_no_mlp); "
                        "the peak is the process's, so list the smaller-memory ones first; "
                        "':unrolled' after one runs the layers unrolled (scan_layers=False)")
    p.add_argument("--hf-batch", default=None,
                   help="transformers + PEFT batches, ':gc' for gradient checkpointing "
                        "(default 2,8:gc; none for 70b); '' skips")
    p.add_argument("--loss-chunk", type=int, default=512, help="sequence chunk of the loss")
    p.add_argument("--param-dtype", default="float32",
                   help="our adapters' (and their AdamW moments') dtype; bfloat16 saves 1.6 GB "
                        "on the 70B shape")
    p.add_argument("--mu-dtype", choices=("bfloat16",), default=None,
                   help="our AdamW first moment in bf16 (lora.mu_dtype; 0.4 GB less on the 70B "
                        "shape; default: as the adapters, float32, like torch AdamW)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation) first")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="skip our remaining configurations after this many seconds")
    p.add_argument("--compile-only", action="store_true",
                   help="ours only: compile each step and print its memory analysis, run nothing")
    p.add_argument("--json", default=None, help="also append the JSON lines to this file")
    p.add_argument("--side", choices=("jax", "hf"), help=argparse.SUPPRESS)
    args = p.parse_args()
    big = args.shape == "70b"
    args.shape = "tiny" if args.tiny else args.shape
    args.batch = args.batch or ("2,4" if args.tiny else "1,2" if big else "8,16")
    args.remat = args.remat or ("none,dots" if args.tiny else "full,dots_no_mlp" if big
                                else "dots,dots_no_mlp,full")
    if args.hf_batch is None:
        args.hf_batch = "" if big else ("2,2:gc" if args.tiny else "2,8:gc")
    if args.compile_only:
        args.hf_batch = ""
    if args.tiny:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.side == "jax":
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
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
    base = f"{args.quantize} (QLoRA)" if args.quantize else "bf16"
    print(f"\nLoRA train step, {args.shape} shape (hidden {shape['hidden_size']}, "
          f"{shape['num_hidden_layers']} layers, vocab {shape['vocab_size']}, seq {shape['seq']}), "
          f"rank {RANK} on {len(TARGETS)} projections, base {base}; median of {args.steps} steps")
    for r in rows:
        if r.get("what") == "device":
            print(f"  {r['side']}: {r['name']}")
    print(f"{'impl':<20}{'batch':>6}{'remat':>14}{'tok/s':>10}{'TFLOP/s':>9}{'step ms':>9}"
          f"{'peak GB':>9}  note")
    best_hf = max((r["tok_s"] for r in rows if r.get("side") == "hf" and "tok_s" in r),
                  default=None)
    for r in rows:
        if "batch" not in r or r.get("what") == "compiled":
            continue
        impl = "transformers+PEFT" if r["side"] == "hf" else "jais2-jax"
        if "tok_s" in r:
            note = f"{r['tok_s'] / best_hf:.2f}x HF best" if best_hf and r["side"] == "jax" else ""
            if r["side"] == "jax" and args.shape == "70b":
                note += (" fits" if r["fits_h100"] else " does NOT fit") + \
                    f" one H100 ({H100_XLA_BYTES / 1e9:.1f} GB)"
            print(f"{impl:<20}{r['batch']:>6}{r['remat']:>14}{r['tok_s']:>10.0f}"
                  f"{r['tflops']:>9.1f}{1e3 * r['step_s']:>9.1f}{r['peak_gb']:>9.1f}  {note}")
        else:
            print(f"{impl:<20}{r['batch']:>6}{r['remat']:>14}{'':>37}  "
                  f"{r.get('error') or r.get('skipped')}")
    compiled = [r for r in rows if r.get("what") == "compiled"]
    if compiled:
        print(f"\nour compiled step ({compiled[0]['backend']}), GB: arguments (base + state) + "
              f"temporaries + outputs - donated = the peak it implies")
    for r in compiled:
        print(f"  batch {r['batch']}, remat {r['remat']}: {r['argument_gb']:.2f} + "
              f"{r['temp_gb']:.2f} + {r['output_gb']:.2f} - {r['alias_gb']:.2f} = "
              f"{r['compiled_peak_gb']:.2f}"
              + (f" (+ {r['host_temp_gb']:.2f} in host memory)" if r["host_temp_gb"] else ""))


if __name__ == "__main__":
    main()
