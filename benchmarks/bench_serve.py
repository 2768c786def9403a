"""Serving speed: `jais2 serve`'s engine over HTTP vs our offline `generate` vs transformers'
continuous batching (`generate_batch`), in one command.

Random weights of the Jais2 8B shape in bf16 (as bench_generate.py). Requests: 128 random prompt
tokens, 128 new tokens each, EOS ignored. Measured:
  ours over HTTP (the FastAPI app of `jais2 serve`, uvicorn on 127.0.0.1 in this process, 64
  slots, streamed completions with token-id prompts, an httpx client per level): 1, 16 and 64
  concurrent clients, each sending --rounds requests one after the other: output tok/s (all
  completion tokens / wall time), time to first token p50 / p99 (request sent -> first streamed
  chunk), tokens/s per client (a request's tokens / its duration, median);
  ours offline: `generate` at batch 64 (prompt 128, 128 new), tok/s;
  transformers: `generate_batch` of 64 requests (as ../shared/anchors/hf_cb_bench.py: sdpa,
  paged cache of 2048 blocks of 128, max_batch_tokens 4096), tok/s.
Each side runs in its own child process; the parent prints one table.

  python benchmarks/bench_serve.py              # GPU (the lead's H100 run)
  python benchmarks/bench_serve.py --tiny       # CPU check of the script, tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_generate import PREFIX, SHAPE_8B, SHAPE_TINY, emit, random_params


def plan(tiny: bool) -> dict:
    if tiny:
        return {"shape": SHAPE_TINY, "clients": (1, 4, 8), "slots": 8, "prompt": 16, "new": 16,
                    "dtype": "float32", "rounds": 2}
    return {"shape": SHAPE_8B, "clients": (1, 16, 64), "slots": 64, "prompt": 128, "new": 128,
                "dtype": "bfloat16", "rounds": 2}


def pct(values, q):
    import numpy as np
    return float(np.percentile(values, q)) if values else float("nan")


# ---------------------------------------------------------------------------------------- ours
def run_ours(args) -> None:
    import asyncio
    import socket
    import threading

    try:
        import httpx2 as httpx  # what the openai client installs here
    except ImportError:
        import httpx
    import jax
    import numpy as np
    import uvicorn

    from jais2_jax import Jais2Config, ModelOptions, build_inference_program
    from jais2_jax.inference.generate import generate
    from jais2_jax.serving.api import Server, create_app
    from jais2_jax.serving.engine import Engine

    p = plan(args.tiny)
    config = Jais2Config(**p["shape"], bos_token_id=0, eos_token_id=1, pad_token_id=0)
    emit(what="device", side="jax", name=str(jax.devices()[0].device_kind), jax=jax.__version__)
    per_layer = jax.default_backend() != "cpu"
    _, params = random_params(config, p["dtype"], fuse_qkv=per_layer)
    if not per_layer:  # CPU: the stacked tree (random_params makes the per-layer one)
        from jais2_jax import stack_layers
        params = stack_layers(params)
    max_length = -(-(p["prompt"] + p["new"]) // 128) * 128
    program = build_inference_program(
        config, batch_size=p["slots"], max_length=max_length, dtype=p["dtype"],
        options=ModelOptions(scan_layers=not per_layer, fuse_qkv=per_layer))
    rs = np.random.RandomState(0)

    # offline generate at batch = slots, the figure the server is held to
    ids = rs.randint(2, config.vocab_size, (p["slots"], p["prompt"])).astype(np.int32)
    run = lambda: np.asarray(generate(program.model, params, ids, max_new_tokens=p["new"],
                                      eos_token_id=()))
    run()
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    emit(what="offline", side="jax", batch=p["slots"],
         tok_s=p["slots"] * p["new"] / statistics.median(times))

    engine = Engine(program, program.place(params), tokenizer=_NullTokenizer(),
                    max_queue=4 * p["slots"], chunk=args.decode_chunk, stop_ids=())
    server = Server(engine, _NullTokenizer(), "bench", chat_template=False)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    engine.compile(widths=(p["prompt"],))
    threading.Thread(target=engine.run, daemon=True).start()
    uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning", access_log=False))
    threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True).start()

    async def one(client, prompt, out):
        body = {"model": "bench", "prompt": prompt, "max_tokens": p["new"], "temperature": 0,
                "stream": True}
        t0 = time.perf_counter()
        first, tokens = None, 0
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200, r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None:
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        end = time.perf_counter()
        out.append((first - t0, tokens, tokens / (end - t0)))

    async def level(n, rounds):
        limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            out: list = []

            async def user():
                for _ in range(rounds):
                    prompt = rs.randint(2, config.vocab_size, p["prompt"]).tolist()
                    await one(client, prompt, out)

            t = time.perf_counter()
            await asyncio.gather(*(user() for _ in range(n)))
            wall = time.perf_counter() - t
        return out, wall

    while not uv.started:
        time.sleep(0.01)
    asyncio.run(level(min(4, p["slots"]), 1))  # warm-up: compiles prefill buckets and decode
    for n in p["clients"]:
        out, wall = asyncio.run(level(n, p["rounds"]))
        ttft = [o[0] for o in out]
        emit(what="http", side="jax", clients=n, requests=len(out),
             tok_s=sum(o[1] for o in out) / wall, ttft_p50=pct(ttft, 50), ttft_p99=pct(ttft, 99),
             per_client_tok_s=statistics.median(o[2] for o in out),
             tokens_ok=all(o[1] == p["new"] for o in out))
    uv.should_exit = True


class _NullTokenizer:
    """Random token ids: text is not measured (ids rendered as nothing)."""

    def decode(self, ids, skip_special_tokens=False):
        return ""

    def encode(self, text):
        raise ValueError("this benchmark sends token ids")


# ------------------------------------------------------------------------------------ transformers
def run_hf(args) -> None:
    import torch
    import transformers
    from transformers import GenerationConfig, Jais2Config, Jais2ForCausalLM

    p = plan(args.tiny)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    emit(what="device", side="hf", name=torch.cuda.get_device_name() if device == "cuda" else "cpu",
         transformers=transformers.__version__)
    torch.manual_seed(0)
    with torch.device(device):
        model = Jais2ForCausalLM(Jais2Config(**p["shape"])).to(
            torch.bfloat16 if p["dtype"] == "bfloat16" else torch.float32).eval()
    model.config._attn_implementation = "sdpa"
    n = p["slots"]
    reqs = [torch.randint(3, p["shape"]["vocab_size"], (p["prompt"],)).tolist() for _ in range(n)]
    gc = GenerationConfig(max_new_tokens=p["new"], do_sample=False, eos_token_id=-1,
                          pad_token_id=0, num_blocks=2048 if not args.tiny else 64,
                          block_size=128 if not args.tiny else 32, max_batch_tokens=4096)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    model.generate_batch(inputs=reqs[:4], generation_config=gc)  # warm-up
    sync()
    t = time.perf_counter()
    out = model.generate_batch(inputs=reqs, generation_config=gc)
    sync()
    s = time.perf_counter() - t
    tokens = sum(len(v.generated_tokens) for v in out.values())
    emit(what="generate_batch", side="hf", requests=len(out), tok_s=tokens / s)


# ---------------------------------------------------------------------------------------- report
def table(results: list[dict]) -> str:
    rows = [f"{'what':<34}{'tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'tok/s/client':>14}"]
    by = {}
    for r in results:
        if r["what"] == "device":
            rows.insert(0, f"# {r['side']}: {r['name']}")
        elif r["what"] == "offline":
            by["offline"] = r["tok_s"]
            rows.append(f"{'ours: generate, batch ' + str(r['batch']):<34}{r['tok_s']:>10.0f}")
        elif r["what"] == "http":
            by[r["clients"]] = r["tok_s"]
            rows.append(f"{'ours: HTTP, ' + str(r['clients']) + ' clients':<34}{r['tok_s']:>10.0f}"
                        f"{r['ttft_p50'] * 1e3:>8.0f}ms{r['ttft_p99'] * 1e3:>8.0f}ms"
                        f"{r['per_client_tok_s']:>14.1f}"
                        + ("" if r["tokens_ok"] else "  (short replies!)"))
        elif r["what"] == "generate_batch":
            by["hf"] = r["tok_s"]
            rows.append(f"{'transformers: generate_batch':<34}{r['tok_s']:>10.0f}")
        elif r["side"] == "error":
            rows.append(f"{r['what']}: {r['error']}")
    top = max((k for k in by if isinstance(k, int)), default=None)
    if top is not None and "offline" in by:
        rows.append(f"HTTP at {top} clients / offline generate: {by[top] / by['offline']:.2f}")
    if top is not None and "hf" in by:
        rows.append(f"HTTP at {top} clients / transformers generate_batch: "
                    f"{by[top] / by['hf']:.2f}x")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the script")
    parser.add_argument("--skip-hf", action="store_true", help="only measure jais2_jax")
    parser.add_argument("--reps", type=int, default=3, help="offline generate repetitions")
    parser.add_argument("--decode-chunk", type=int, default=8,
                        help="the engine's decode steps per host sync")
    parser.add_argument("--json", default=None, help="also write all results to this file")
    parser.add_argument("--side", choices=("jax", "hf"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "jax":
        run_ours(args)
        return 0
    if args.side == "hf":
        run_hf(args)
        return 0
    results = []
    for side in ["jax"] + ([] if args.skip_hf else ["hf"]):
        env = dict(os.environ)
        if args.tiny:
            env["JAX_PLATFORMS"] = "cpu"
            env["CUDA_VISIBLE_DEVICES"] = ""
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
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
