"""Evaluation speed: our lm-eval model (`jais2`) vs lm-eval's own `hf` model, in one command.

Random weights of the Jais2 8B shape (configs/jais2-8b.json) in bf16, the bundled tokenizer
(data/tokenizer; its ids are a subset of the 8B vocabulary), and two local workloads built the way
lm-eval builds its requests:
  multiple choice: 512 questions x 4 answers = 2,048 `loglikelihood` requests (context 40-160
    words of the bundled corpus, answers 2-12 words, as " " + answer);
  generate-until: 512 prompts of 20-80 words (`--prompts`; the sessions before the seventh used
    the first 128), greedy, `max_gen_toks` 64, until "\\n\\n" (random weights rarely stop early,
    so both sides generate about 64 tokens a prompt).
Each side calls its LM's `loglikelihood` / `generate_until` on the same requests. Ours: a full pass
to compile (warm-up), then a timed full pass, at batch 64 for multiple choice and 256 for
generate-until (`--ours-batches` sets both); `hf`: a short warm-up, then a timed full pass at each
of batch 8, 16, 32, 64 (`--hf-batches`). Each side's best batch size is reported, requests/s, and
the ratio. Each side runs in its own child process (JAX and torch would fight over GPU memory).

  python benchmarks/bench_eval.py                  # GPU (H100), both sides
  python benchmarks/bench_eval.py --skip-hf        # ours only
  python benchmarks/bench_eval.py --tiny           # CPU check of the script, tiny model
  python benchmarks/bench_eval.py --count-positions   # CPU: positions forwarded (padding included)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PREFIX = "RESULT "
TOKENIZER = os.path.join(ROOT, "data", "tokenizer")
CORPUS = [os.path.join(ROOT, "data", "corpus", f) for f in ("english.txt", "arabic.txt")]
SHAPE_TINY = {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
              "max_position_embeddings": 512}


def plan(tiny: bool, prompts: int | None = None) -> dict:
    p = _plan(tiny)
    if prompts:
        p["prompts"] = prompts
    return p


def _plan(tiny: bool) -> dict:
    if tiny:
        return {"shape": SHAPE_TINY, "dtype": "float32", "questions": 32, "prompts": 8,
                "max_gen": 8, "ours_batches": (8, 16), "hf_batches": (8, 16),
                "gen_batches": (8,)}
    with open(os.path.join(ROOT, "configs", "jais2-8b.json"), encoding="utf-8") as f:
        shape = {k: v for k, v in json.load(f).items() if k not in (
            "architectures", "model_type", "bos_token_id", "eos_token_id", "pad_token_id")}
    return {"shape": shape, "dtype": "bfloat16", "questions": 512, "prompts": 512,
            "max_gen": 64, "ours_batches": (64,), "hf_batches": (8, 16, 32, 64),
            "gen_batches": (256,)}


def set_prefill_groups(spec: str) -> tuple[int, int]:
    """--prefill-groups ROWS:PARTS into `scoring.PREFILL_ROWS` and `scoring.GROUP_PARTS`."""
    from jais2_jax.evaluation import scoring
    scoring.PREFILL_ROWS, scoring.GROUP_PARTS = map(int, spec.split(":"))
    return scoring.PREFILL_ROWS, scoring.GROUP_PARTS


def emit(**kw) -> None:
    print(PREFIX + json.dumps(kw), flush=True)


def requests(p: dict):
    """The two workloads as lm-eval Instances (the same on both sides: seeded)."""
    import numpy as np
    from lm_eval.api.instance import Instance
    words = []
    for path in CORPUS:
        with open(path, encoding="utf-8") as f:
            words += f.read().split()
    rng = np.random.default_rng(0)
    text = lambda n: " ".join(rng.choice(words, n))
    mc = []
    for q in range(p["questions"]):
        context = text(int(rng.integers(40, 161))) + "\nAnswer:"
        for a in range(4):
            mc.append(Instance("loglikelihood", {}, (context, " " + text(int(rng.integers(2, 13)))),
                               a, metadata=("mc", q, None)))
    gen = [Instance("generate_until", {}, (text(int(rng.integers(20, 81))),
                                           {"until": ["\n\n"], "max_gen_toks": p["max_gen"],
                                            "do_sample": False}), 0, metadata=("gen", i, None))
           for i in range(p["prompts"])]
    return mc, gen


def timed(fn, sync=lambda: None) -> float:
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def guard(name, fn, *a):
    try:
        fn(*a)
    except Exception as e:  # noqa: BLE001  (one failed figure is reported, the rest go on)
        emit(what=name, side="error", error=f"{type(e).__name__}: {e}"[:300])


# ---------------------------------------------------------------------------------------- ours
def run_ours(args) -> None:
    # batch 256 of generate-until holds a 42 GB cache beside the 16 GB of weights: more than
    # jax's default 75% of an H100
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    import jax
    from bench_generate import random_params

    from jais2_jax import Jais2Config, Tokenizer
    from jais2_jax.evaluation.lm import Jais2LM
    from jais2_jax.model.options import as_dtype

    p = plan(args.tiny, args.prompts)
    if args.prefill_groups:  # an experiment: generate-until's prefill groups (rows:parts)
        rows, parts = set_prefill_groups(args.prefill_groups)
        emit(what="prefill_groups", side="jax", rows=rows, parts=parts)
    if args.ours_batches:
        p["ours_batches"] = p["gen_batches"] = tuple(map(int, args.ours_batches.split(",")))
    config = Jais2Config(**p["shape"], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    emit(what="device", side="jax", name=str(jax.devices()[0].device_kind), jax=jax.__version__)
    _, params = random_params(config, as_dtype(p["dtype"]), fuse_qkv=True)  # per layer, fused
    lm = Jais2LM.from_params(config, params, Tokenizer.from_pretrained(TOKENIZER),
                             dtype=p["dtype"])
    mc, gen = requests(p)

    def case(what, batches, call, reqs):
        for b in batches:
            lm.batch_size_per_device = b
            warm = timed(lambda: call(reqs, disable_tqdm=True))  # compiles every shape
            lm.tokens_forwarded = 0
            s = timed(lambda: call(reqs, disable_tqdm=True))
            emit(what=what, side="jax", batch=b, requests=len(reqs), seconds=s,
                 req_s=len(reqs) / s, warmup_s=warm, positions=lm.tokens_forwarded)
            if args.profile:  # one more (warm) pass under the profiler: kernel time by kind
                from profile_gpu import summarize, trace
                d, wall = trace(lambda: call(reqs, disable_tqdm=True), 1, args.profile,
                                f"eval_{what}_{b}")
                print(summarize(d, 1, wall), flush=True)

    if jax.default_backend() == "gpu":
        guard("check", check_packed_attention)
    if "mc" in args.cases:
        guard("mc", case, "mc", p["ours_batches"], lm.loglikelihood, mc)
    if "gen" in args.cases:
        guard("gen", case, "gen", p["gen_batches"], lm.generate_until, gen)


def check_packed_attention() -> None:
    """cuDNN attention with a packed [batch, q, kv] mask (as a bias) against XLA's on the same
    random bf16 inputs: the packed multiple-choice path runs the former on a GPU."""
    import jax
    import jax.numpy as jnp

    from jais2_jax.model.attention import dot_product_attention
    b, t, h, d = 4, 448, 26, 128
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(x, (b, t, h, d), jnp.bfloat16) for x in (kq, kk, kv))
    docs = jnp.repeat(jnp.arange(1, 5), t // 4)[None].repeat(b, 0)  # 4 questions a row
    parts = (jnp.arange(t) % (t // 4) // 40)[None].repeat(b, 0)  # context, then answers
    mask = (docs[:, :, None] == docs[:, None, :]) & (
        (parts[:, None, :] == 0) | (parts[:, :, None] == parts[:, None, :]))
    out = {impl: jax.jit(lambda q, k, v, m, impl=impl: dot_product_attention(
        q, k, v, kv_mask=m, implementation=impl))(q, k, v, mask).astype(jnp.float32)
        for impl in ("cudnn", "xla")}
    err = float(jnp.max(jnp.abs(out["cudnn"] - out["xla"])))
    scale = float(jnp.max(jnp.abs(out["xla"])))
    emit(what="check", side="jax", cudnn_vs_xla_max_abs=err, xla_max_abs=scale,
         ok=bool(err <= 2e-2 * scale))


def count_positions(args) -> None:
    """The positions our loglikelihood forwards (padding included) for the full multiple-choice
    workload at batch 64, and generate-until's prefill positions at batch 256, counted with the
    tiny shape on the CPU: the counts depend only on the requests' token lengths, not on the
    model, so they are the 8B run's."""
    import jax
    from bench_generate import random_params

    from jais2_jax import Jais2Config, Tokenizer
    from jais2_jax.evaluation.lm import Jais2LM

    p = plan(False)
    shape = dict(SHAPE_TINY, max_position_embeddings=p["shape"]["max_position_embeddings"])
    config = Jais2Config(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    _, params = random_params(config, jax.numpy.float32, fuse_qkv=False)
    lm = Jais2LM.from_params(config, params, Tokenizer.from_pretrained(TOKENIZER),
                             dtype="float32")
    batches = [int(b) for b in (args.ours_batches or "64,256").split(",")]
    if "mc" in args.cases:
        lm.batch_size_per_device = batches[0]
        mc, _ = requests(p)
        lm.loglikelihood(mc, disable_tqdm=True)
        print(f"multiple choice: {len(mc)} requests, {lm.tokens_forwarded} positions forwarded "
              f"at batch {lm.batch_size_per_device}")
    if "gen" in args.cases:  # the prefill's positions; 2 new tokens (the count does not change)
        from jais2_jax.evaluation import scoring
        p = dict(plan(False, args.prompts), max_gen=2)
        if args.prefill_groups:
            set_prefill_groups(args.prefill_groups)
        _, gen = requests(p)
        counted, prefill = [], scoring.prefill
        scoring.prefill = lambda model, params, ids, *a: counted.append(ids.size) or prefill(
            model, params, ids, *a)
        lm.batch_size_per_device = batches[-1]
        lm.generate_until(gen, disable_tqdm=True)
        tokens = sum(len(lm.tok_encode(r.args[0])) for r in gen)
        print(f"generate-until: {len(gen)} prompts ({tokens} tokens), {sum(counted)} prefill "
              f"positions at batch {lm.batch_size_per_device}, groups of "
              f"{scoring.PREFILL_ROWS} rows, widths to 1/{scoring.GROUP_PARTS} octave")


# ------------------------------------------------------------------------------------------ hf
def run_hf(args) -> None:
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM
    from transformers import Jais2Config, Jais2ForCausalLM, PreTrainedTokenizerFast

    p = plan(args.tiny, args.prompts)
    if args.hf_batches:
        p["hf_batches"] = tuple(map(int, args.hf_batches.split(",")))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if p["dtype"] == "bfloat16" else torch.float32
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    emit(what="device", side="hf", name=torch.cuda.get_device_name(0) if dev.type == "cuda"
         else "cpu", torch=torch.__version__, transformers=transformers.__version__)
    cfg = Jais2Config(**p["shape"], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(dev):
        model = Jais2ForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    lm = HFLM(pretrained=model, tokenizer=PreTrainedTokenizerFast.from_pretrained(TOKENIZER),
              batch_size=8)
    mc, gen = requests(p)

    def case(what, batches, call, reqs):
        lm.batch_size_per_gpu = batches[0]
        timed(lambda: call(reqs[:2 * batches[0]], disable_tqdm=True), sync)  # warm-up
        for b in batches:
            lm.batch_size_per_gpu = b
            try:
                s = timed(lambda: call(reqs, disable_tqdm=True), sync)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                emit(what=what, side="hf_oom", batch=b)
                continue
            emit(what=what, side="hf", batch=b, requests=len(reqs), seconds=s,
                 req_s=len(reqs) / s)

    with torch.no_grad():
        if "mc" in args.cases:
            guard("mc", case, "mc", p["hf_batches"], lm.loglikelihood, mc)
        if "gen" in args.cases:
            guard("gen", case, "gen", p["hf_batches"], lm.generate_until, gen)


# ------------------------------------------------------------------------------------------ table
def table(results: list[dict], tiny: bool) -> str:
    lines = [f"{r['side']}: {r['name']} " + " ".join(f"{k}={v}" for k, v in r.items()
                                                      if k not in ("what", "side", "name"))
             for r in results if r["what"] == "device"]
    lines += [f"ERROR {r['what']}: {r['error']}" for r in results if r["side"] == "error"]
    lines += [f"hf out of memory: {r['what']} batch {r['batch']}" for r in results
              if r["side"] == "hf_oom"]
    head = f"{'workload':<10}{'side':<6}{'batch':>6}{'requests':>10}{'seconds':>10}{'req/s':>10}"
    lines += ["", head, "-" * len(head)]
    best = {}
    for r in results:
        if "req_s" in r:
            lines.append(f"{r['what']:<10}{r['side']:<6}{r['batch']:>6}{r['requests']:>10}"
                         f"{r['seconds']:>10.2f}{r['req_s']:>10.1f}")
            key = (r["what"], r["side"])
            if key not in best or r["req_s"] > best[key]["req_s"]:
                best[key] = r
    lines.append("")
    for what, label in (("mc", "multiple choice (loglikelihood)"), ("gen", "generate-until")):
        o, h = best.get((what, "jax")), best.get((what, "hf"))
        if o and h:
            lines.append(f"{label}: ours {o['req_s']:.1f} req/s (batch {o['batch']}) vs hf "
                         f"{h['req_s']:.1f} req/s (best batch {h['batch']}): "
                         f"{o['req_s'] / h['req_s']:.2f}x (goal >= 3x)")
    if tiny:
        lines.append("(--tiny: CPU, tiny model: checks the script, not the speed)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the script")
    parser.add_argument("--skip-hf", action="store_true", help="only measure jais2_jax")
    parser.add_argument("--skip-ours", action="store_true", help="only measure lm-eval's hf")
    parser.add_argument("--ours-batches", default=None,
                        help="our batch sizes, comma-separated (default 64; each compiles its "
                             "shapes: about a dozen programs)")
    parser.add_argument("--hf-batches", default=None,
                        help="hf's batch sizes to try (default 8,16,32,64; its best is compared)")
    parser.add_argument("--prompts", type=int, default=None,
                        help="generate-until prompts (default 512; the same seed, so the first N "
                             "are the same for any N)")
    parser.add_argument("--prefill-groups", default=None,
                        help="ROWS:PARTS: generate-until prefills ROWS prompts at a time, each "
                             "group's width rounded to 1/PARTS of its octave (default 32:8)")
    parser.add_argument("--cases", default="mc,gen",
                        help="which tasks: mc (multiple choice), gen (generate-until), or both")
    parser.add_argument("--json", default=None, help="also write all results to this file")
    parser.add_argument("--count-positions", action="store_true",
                        help="only count the positions our passes forward, padding included (CPU; "
                             "--cases, --prompts, --prefill-groups, --ours-batches MC,GEN apply)")
    parser.add_argument("--profile", default=None,
                        help="GPU: trace one more pass of each case into this folder and print "
                             "kernel time by kind (with --side jax)")
    parser.add_argument("--side", choices=("jax", "hf"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.count_positions:
        count_positions(args)
        return 0
    if args.side == "jax":
        run_ours(args)
        return 0
    if args.side == "hf":
        run_hf(args)
        return 0
    results = []
    for side, skip in (("jax", args.skip_ours), ("hf", args.skip_hf)):
        if skip:
            continue
        env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
        if args.tiny:
            env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
        cmd = [sys.executable, os.path.abspath(__file__), "--side", side] + sys.argv[1:]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        results += [json.loads(line[len(PREFIX):]) for line in proc.stdout.splitlines()
                    if line.startswith(PREFIX)]
        if proc.returncode:
            results.append({"what": f"{side} process", "side": "error",
                                "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results, args.tiny))
    return 0


if __name__ == "__main__":
    sys.exit(main())
