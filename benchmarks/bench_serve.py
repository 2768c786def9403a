"""Serving speed: `jais2 serve`'s engine alone and over HTTP vs our offline `generate` vs
transformers' continuous batching (`generate_batch`), in one command.

Random weights of the Jais2 8B shape in bf16 (as bench_generate.py). Requests: 128 random prompt
tokens, 128 new tokens each, EOS ignored. Measured:
  ours offline: `generate` at batch 64 (prompt 128, 128 new), tok/s: the figure the server is
  held to;
  ours, engine only: `clients` closed-loop users submitting straight to `Engine.submit` (no HTTP;
  a user's next request is submitted when its last one ends), 64 slots: output tok/s, time to
  first token p50 / p99, and the engine's own counters (decode chunks and steps, the engine
  thread's host ms per chunk and ms blocked on the device per chunk, prefill calls and shapes):
  the engine's cost without the HTTP layer's;
  ours over HTTP (the FastAPI app of `jais2 serve`, uvicorn on 127.0.0.1 in this process, 64
  slots, streamed completions with token-id prompts): 1, 16 and 64 concurrent clients, each
  sending --rounds requests one after the other: output tok/s (all completion tokens / wall
  time), time to first token p50 / p99 (request sent -> first streamed chunk), tokens/s per
  client (a request's tokens / its duration, median), and the engine counters over that level.
  The load generator (httpx async clients) runs in 4 separate processes (--client-procs), as
  real clients are independent: one process parsing 64 streams delays the next requests enough
  to cost 0.15 of the ratio to offline (RESULTS.md, H200). In the server's process, parsing the
  streams would take the GIL from the engine thread and the server (--same-process-client
  measures that way, as this benchmark did before);
  transformers: `generate_batch` of 64 requests (as ../shared/anchors/hf_cb_bench.py: sdpa,
  paged cache of 2048 blocks of 128, max_batch_tokens 4096), tok/s.
Each side runs in its own child process; the parent prints one table.

Text: by default token ids are rendered as nothing (`--tokenizer null`, as the earlier runs);
`--tokenizer words` gives every id a word (a `tokenizers` WordLevel vocabulary), so that
detokenizing and the streamed text are measured too.

  python benchmarks/bench_serve.py                          # GPU (the lead's H100/H200 run)
  python benchmarks/bench_serve.py --skip-hf --same-process-client   # the earlier setup
  python benchmarks/bench_serve.py --skip-hf --tokenizer words       # text measured too
  python benchmarks/bench_serve.py --tiny                   # CPU check of the script, tiny model
  python benchmarks/bench_serve.py --tiny --skip-hf --skip-offline --slots 64 --prompt 128 \
      --new 128 --clients 64        # CPU: the engine thread's host ms per chunk at 64 slots
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_generate import PREFIX, SHAPE_8B, SHAPE_TINY, emit, random_params


def plan(tiny: bool, args=None) -> dict:
    if tiny:
        p = {"shape": SHAPE_TINY, "clients": (1, 4, 8), "slots": 8, "prompt": 16, "new": 16,
             "dtype": "float32", "rounds": 2}
    else:
        p = {"shape": SHAPE_8B, "clients": (1, 16, 64), "slots": 64, "prompt": 128, "new": 128,
             "dtype": "bfloat16", "rounds": 2}
    for name in ("slots", "prompt", "new", "rounds"):  # overrides (e.g. --tiny --slots 64)
        if getattr(args, name, None) is not None:
            p[name] = getattr(args, name)
    if getattr(args, "clients", None):
        p["clients"] = tuple(int(c) for c in args.clients.split(","))
    return p


def pct(values, q):
    import numpy as np
    return float(np.percentile(values, q)) if values else float("nan")


def summary(out: list, wall: float, new: int) -> dict:
    """out: (ttft, tokens, duration) per request."""
    ttft = [o[0] for o in out]
    return {"requests": len(out), "tok_s": sum(o[1] for o in out) / wall,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "per_client_tok_s": statistics.median(o[1] / o[2] for o in out),
            "duration_p50": statistics.median(o[2] for o in out),
            "tokens_ok": all(o[1] == new for o in out)}


def stats_delta(engine, before: dict) -> dict:
    after = engine.stats.as_dict()
    d = {k: after[k] - before[k] for k in after if k != "prefill_shapes"}
    d["prefill_shapes"] = {k: v - before["prefill_shapes"].get(k, 0)
                           for k, v in after["prefill_shapes"].items()
                           if v != before["prefill_shapes"].get(k, 0)}
    return d


# ---------------------------------------------------------------------------------------- ours
def run_ours(args) -> None:
    import copy
    import socket

    import jax
    import numpy as np
    import uvicorn

    from jais2_jax import Jais2Config, ModelOptions, build_inference_program
    from jais2_jax.inference.generate import generate
    from jais2_jax.serving.api import Server, create_app
    from jais2_jax.serving.engine import Engine, Request

    p = plan(args.tiny, args)
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

    if not args.skip_offline:  # offline generate at batch = slots, the figure the server is held to
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
             tok_s=p["slots"] * p["new"] / statistics.median(times),
             seconds=statistics.median(times))

    tokenizer = _NullTokenizer() if args.tokenizer == "null" else _WordTokenizer(config.vocab_size)
    engine = Engine(program, program.place(params), tokenizer=tokenizer,
                    max_queue=4 * p["slots"], chunk=args.decode_chunk, stop_ids=(),
                    short_chunk=args.short_chunk)
    engine.compile(widths=(p["prompt"],))
    threading.Thread(target=engine.run, daemon=True).start()

    def prompt():
        return rs.randint(2, config.vocab_size, p["prompt"]).tolist()

    # -- the engine alone: closed-loop users submitting straight to the engine
    def engine_level(n, rounds):
        out, done, lock = [], threading.Semaphore(0), threading.Lock()

        def user(left):
            t0, first, tokens = time.perf_counter(), [None], [0]

            def on_event(ev):
                if ev[0] == "delta":
                    if first[0] is None:
                        first[0] = time.perf_counter()
                    tokens[0] += len(ev[2])
                elif ev[0] in ("done", "error"):
                    with lock:
                        out.append((first[0] - t0, tokens[0], time.perf_counter() - t0))
                    if left > 1:  # the next request of this user, at once (on the engine thread)
                        user(left - 1)
                    else:
                        done.release()
            engine.submit(Request(prompt_ids=prompt(), max_tokens=p["new"], emit=on_event))

        t = time.perf_counter()
        for _ in range(n):
            user(rounds)
        for _ in range(n):
            done.acquire()
        return out, time.perf_counter() - t

    engine_level(min(4, p["slots"]), 1)  # warm-up
    for n in (p["slots"],):
        before = copy.deepcopy(engine.stats.as_dict())
        out, wall = engine_level(n, p["rounds"])
        emit(what="engine", side="jax", clients=n, **summary(out, wall, p["new"]),
             stats=stats_delta(engine, before), wall=wall)

    # -- over HTTP
    server = Server(engine, tokenizer, "bench", chat_template=False)

    def start(stack: str):
        """uvicorn on a fresh localhost port with `stack` = "LOOP:HTTP" ("auto:auto" is what
        `jais2 serve` gets: uvloop and httptools where installed, else asyncio and h11)."""
        loop, _, http = stack.partition(":")
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(4096)
        uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning",
                                           access_log=False, loop=loop, http=http or "auto"))
        thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not uv.started:
            time.sleep(0.01)
        return uv, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"

    url_now = [None]

    def http_level(n, rounds, procs=1):
        job = {"url": url_now[0], "clients": n, "rounds": rounds, "new": p["new"],
               "prompt": p["prompt"],
               "vocab": config.vocab_size, "seed": int(rs.randint(1 << 30))}
        if args.same_process_client:
            return load(job)
        # --client-procs k: k load generators of n / k clients each, all starting at one moment
        # (a wall-clock instant after every process has started), as independent clients do
        k = max(1, min(procs, n))
        job["start_at"] = time.time() + (1.0 + 0.3 * k if k > 1 else 0.0)
        procs = []
        for i in range(k):
            part = dict(job, clients=n // k + (i < n % k), seed=job["seed"] + i)
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--side",
                                           "client", "--job", json.dumps(part)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        out, walls = [], []
        for proc in procs:
            stdout, stderr = proc.communicate()
            if proc.returncode:
                raise RuntimeError(f"the load generator failed: {stderr[-2000:]}")
            got = json.loads(stdout.strip().splitlines()[-1])
            out += got["out"]
            walls.append(got["wall"])
        return out, max(walls)

    submitted = []  # when each request reached the engine: how fast HTTP delivers a burst
    plain_submit = engine.submit

    def timed_submit(r):
        submitted.append(time.perf_counter())
        return plain_submit(r)
    engine.submit = timed_submit

    default_interval = sys.getswitchinterval()
    for stack in args.http_stacks.split(","):
        uv, thread, url_now[0] = start(stack)
        http_level(min(4, p["slots"]), 1)  # warm-up
        for n in p["clients"]:
            for procs in map(int, str(args.client_procs).split(",")):
                for interval in str(args.switch_interval or default_interval).split(","):
                    sys.setswitchinterval(float(interval))
                    before = copy.deepcopy(engine.stats.as_dict())
                    submitted.clear()
                    out, wall = http_level(n, p["rounds"], procs)
                    first_round = sorted(submitted)[:n]
                    emit(what="http", side="jax", clients=n, **summary(out, wall, p["new"]),
                         stats=stats_delta(engine, before), wall=wall, client_procs=procs,
                         switch_interval=float(interval), stack=stack,
                         burst_s=first_round[-1] - first_round[0])  # 1st to n-th at the engine
        sys.setswitchinterval(default_interval)
        uv.should_exit = True
        thread.join(timeout=30)


def load(job: dict):
    """`clients` users, each sending `rounds` streamed completions one after the other; returns
    ((ttft, tokens, duration) per request, wall seconds)."""
    import asyncio

    import numpy as np
    try:
        import httpx2 as httpx  # what the openai client installs here
    except ImportError:
        import httpx

    rs = np.random.RandomState(job["seed"])
    url, n = job["url"], job["clients"]

    async def one(client, prompt, out):
        body = {"model": "bench", "prompt": prompt, "max_tokens": job["new"], "temperature": 0,
                "stream": True}
        t0 = time.perf_counter()
        first, tokens = None, 0
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200, r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if first is None:
                    first = time.perf_counter()
                if '"usage"' in line:
                    tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        out.append((first - t0, tokens, time.perf_counter() - t0))

    async def level():
        limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            out: list = []

            async def user():
                for _ in range(job["rounds"]):
                    prompt = rs.randint(2, job["vocab"], job["prompt"]).tolist()
                    await one(client, prompt, out)

            if job.get("start_at"):  # several load generators: start together
                await asyncio.sleep(max(0.0, job["start_at"] - time.time()))
            t = time.perf_counter()
            await asyncio.gather(*(user() for _ in range(n)))
            return out, time.perf_counter() - t

    return asyncio.run(level())


class _NullTokenizer:
    """Random token ids: text is not measured (ids rendered as nothing)."""

    def decode(self, ids, skip_special_tokens=False):
        return ""

    def encode(self, text):
        raise ValueError("this benchmark sends token ids")


class _WordTokenizer:
    """Every id a word ("w123 w7 ..."): detokenizing costs what a real tokenizer's does."""

    def __init__(self, vocab_size: int):
        from tokenizers import Tokenizer, models
        self.tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)},
                                              unk_token="w0"))

    def decode(self, ids, skip_special_tokens=False):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode(self, text):
        raise ValueError("this benchmark sends token ids")


# ------------------------------------------------------------------------------------ transformers
def run_hf(args) -> None:
    import torch
    import transformers
    from transformers import GenerationConfig, Jais2Config, Jais2ForCausalLM

    p = plan(args.tiny, args)
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
    head = f"{'what':<34}{'tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'tok/s/client':>14}"
    rows = [head + f"{'req s p50':>11}"]
    notes, by = [], {}
    for r in results:
        if r["what"] == "device":
            rows.insert(0, f"# {r['side']}: {r['name']}")
        elif r["what"] == "offline":
            by["offline"] = r["tok_s"]
            rows.append(f"{'ours: generate, batch ' + str(r['batch']):<34}{r['tok_s']:>10.0f}"
                        f"{'':>34}{r['seconds']:>11.2f}")
        elif r["what"] in ("http", "engine"):
            name = f"ours: {'HTTP' if r['what'] == 'http' else 'engine only'}, {r['clients']} " \
                   "clients"
            if r["what"] == "http":
                by[r["clients"]] = r["tok_s"]
            else:
                by["engine"] = r["tok_s"]
            rows.append(f"{name:<34}{r['tok_s']:>10.0f}"
                        f"{r['ttft_p50'] * 1e3:>8.0f}ms{r['ttft_p99'] * 1e3:>8.0f}ms"
                        f"{r['per_client_tok_s']:>14.1f}{r['duration_p50']:>11.2f}"
                        + ("" if r["tokens_ok"] else "  (short replies!)"))
            st = r["stats"]
            chunks = max(st["chunks"], 1)
            notes.append(
                f"  {name}: {st['steps']} decode steps in {st['chunks']} chunks "
                f"({r['wall'] * 1e3 / max(st['steps'], 1):.2f} ms of wall per step); engine "
                f"thread per chunk: host {st['host_s'] * 1e3 / chunks:.2f} ms, blocked on the "
                f"device {st['wait_s'] * 1e3 / chunks:.2f} ms; idle {st['idle_s']:.2f} s; "
                f"prefill: {st['prefill_calls']} calls, {st['prefill_requests']} requests in "
                f"{st['prefill_rows']} rows {st['prefill_shapes']}")
        elif r["what"] == "generate_batch":
            by["hf"] = r["tok_s"]
            rows.append(f"{'transformers: generate_batch':<34}{r['tok_s']:>10.0f}")
        elif r["side"] == "error":
            rows.append(f"{r['what']}: {r['error']}")
    top = max((k for k in by if isinstance(k, int)), default=None)
    if "engine" in by and "offline" in by:
        rows.append(f"engine only / offline generate: {by['engine'] / by['offline']:.2f}")
    if top is not None and "offline" in by:
        rows.append(f"HTTP at {top} clients / offline generate: {by[top] / by['offline']:.2f}")
    if top is not None and "hf" in by:
        rows.append(f"HTTP at {top} clients / transformers generate_batch: "
                    f"{by[top] / by['hf']:.2f}x")
    return "\n".join(rows + ["engine counters:"] + notes if notes else rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the script")
    parser.add_argument("--skip-hf", action="store_true", help="only measure jais2_jax")
    parser.add_argument("--reps", type=int, default=3, help="offline generate repetitions")
    parser.add_argument("--decode-chunk", type=int, default=8,
                        help="the engine's decode steps per dispatch")
    parser.add_argument("--short-chunk", type=int, default=None,
                        help="steps per dispatch while admitting (default: decode-chunk // 4)")
    parser.add_argument("--tokenizer", choices=("null", "words"), default="null",
                        help="null: ids rendered as nothing; words: a word per id (detokenizing "
                             "measured)")
    parser.add_argument("--same-process-client", action="store_true",
                        help="run the HTTP load generator in the server's process (as before)")
    parser.add_argument("--client-procs", default="4",
                        help="split each HTTP level's clients over this many load generator "
                             "processes (one process's httpx is the bottleneck at 64 clients: "
                             "H200, 0.69 of offline with 1, 0.85 with 4 or 8); a "
                             "comma-separated list runs each level once per value")
    parser.add_argument("--http-stacks", default="auto:auto",
                        help="uvicorn's event loop and HTTP parser, LOOP:HTTP, comma-separated "
                             "(e.g. asyncio:h11,uvloop:httptools); auto:auto is jais2 serve's")
    parser.add_argument("--switch-interval", default=None,
                        help="sys.setswitchinterval in the server process, where the engine "
                             "thread and the event loop share the GIL (Python's default: 0.005 "
                             "s); a comma-separated list runs each level once per value")
    parser.add_argument("--skip-offline", action="store_true",
                        help="skip the offline generate figure")
    parser.add_argument("--slots", type=int, default=None, help="override the plan's slots")
    parser.add_argument("--prompt", type=int, default=None, help="override the prompt length")
    parser.add_argument("--new", type=int, default=None, help="override the new tokens")
    parser.add_argument("--rounds", type=int, default=None, help="override requests per client")
    parser.add_argument("--clients", default=None, help="HTTP client levels, e.g. 1,16,64")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write all results to this file")
    parser.add_argument("--side", choices=("jax", "hf", "client"), default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "client":
        out, wall = load(json.loads(args.job))
        print(json.dumps({"out": out, "wall": wall}))
        return 0
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
