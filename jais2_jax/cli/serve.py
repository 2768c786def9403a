"""`jais2 serve --checkpoint DIR_OR_ID`: an OpenAI-compatible HTTP server with continuous batching.

Loads the checkpoint (optionally with an adapter merged, or int8/fp8 weights), compiles the engine's
steps, binds the socket, then prints one line `ready on http://HOST:PORT` (with `--port 0`, the
port the system picked) and serves until SIGINT/SIGTERM: then it stops accepting, lets requests in
flight finish for up to `--shutdown-timeout` seconds, cancels the rest and exits 0.
"""

from __future__ import annotations

import sys

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="HF or Orbax checkpoint folder, or a Hugging Face model id")
    parser.add_argument("--revision", default=None,
                        help="branch, tag or commit of a Hugging Face model id (default: main)")
    parser.add_argument("--adapter", default=None,
                        help="PEFT LoRA adapter folder (or hub id), merged into the weights")
    parser.add_argument("--quantize", choices=("int8", "fp8", "nf4"), default=None,
                        help="weight-only int8 / fp8 / nf4 projections, quantized while loading")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="compute and parameter dtype (default: bfloat16 on GPU/TPU, else "
                             "float32)")
    parser.add_argument("--mesh", default=None,
                        help="mesh over all devices (e.g. tp, 1,1,-1); default: one device")
    parser.add_argument("--max-slots", type=int, default=8,
                        help="requests decoded together (the decode step's batch)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests that may wait for a slot; more are answered 503")
    parser.add_argument("--max-length", type=int, default=None,
                        help="context per slot: prompt + output tokens (default: the model's "
                             "max_position_embeddings, at most 4096)")
    parser.add_argument("--decode-chunk", type=int, default=8,
                        help="decode steps per dispatch (the engine keeps one chunk in flight ahead of the "
                             "host; a quarter of it right after slots change)")
    parser.add_argument("--model-name", default=None,
                        help="the name clients pass as `model` (default: --checkpoint)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="0: a free port, printed")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds requests in flight may take to finish after SIGTERM")


def run(args) -> int:
    import os
    import signal
    import socket
    import threading

    import jax
    import uvicorn

    from jais2_jax import Tokenizer, load_checkpoint, unstack_layers
    from jais2_jax.checkpoint.hub import resolve_checkpoint
    from jais2_jax.inference.program import build_inference_program
    from jais2_jax.model.config import read_json_object
    from jais2_jax.model.options import ModelOptions
    from jais2_jax.parallel.sharding import make_mesh
    from jais2_jax.serving.api import Server, create_app
    from jais2_jax.serving.engine import Engine

    for name in ("max_slots", "max_queue", "decode_chunk"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    folder = resolve_checkpoint(args.checkpoint, args.revision)
    tokenizer = Tokenizer.from_pretrained(folder)
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    mesh = None if args.mesh is None else make_mesh(args.mesh)
    load_kw = {} if args.adapter is None else {"adapter": resolve_checkpoint(args.adapter)}
    config, params = load_checkpoint(folder, dtype=dtype, mesh=mesh, quantize=args.quantize,
                                     **load_kw)
    limit = config.max_position_embeddings
    max_length = args.max_length or min(limit, 4096)
    if not 0 < max_length <= limit:
        raise ValueError(f"--max-length must be in [1, {limit}] (max_position_embeddings)")
    per_layer = jax.default_backend() != "cpu"  # as `jais2 generate`: per-layer weights on GPU
    options = ModelOptions(scan_layers=not per_layer, fuse_qkv=per_layer and mesh is None)
    program = build_inference_program(config, batch_size=args.max_slots, max_length=max_length,
                                      mesh=mesh, dtype=dtype, options=options,
                                      quantization=args.quantize)
    if per_layer:
        params = unstack_layers(params, fuse_qkv=options.fuse_qkv)
    params = program.place(params)
    stop_ids = list(config.eos_token_ids)
    gen = os.path.join(folder, "generation_config.json")
    if os.path.exists(gen):
        eos = read_json_object(gen).get("eos_token_id")
        stop_ids += [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None:
        stop_ids.append(tokenizer.eos_token_id)
    engine = Engine(program, params, tokenizer, max_queue=args.max_queue,
                    chunk=args.decode_chunk, stop_ids=tuple(dict.fromkeys(stop_ids)))
    warm_up(engine)
    server = Server(engine, tokenizer, args.model_name or args.checkpoint,
                    chat_template=tokenizer.chat_template is not None)
    app = create_app(server)

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)  # connections wait in the backlog until uvicorn's loop accepts them
    port = sock.getsockname()[1]

    worker = threading.Thread(target=engine.run, name="jais2-engine", daemon=True)
    worker.start()
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                       timeout_graceful_shutdown=args.shutdown_timeout))
    shown = "[" + args.host + "]" if ":" in args.host else args.host
    print(f"ready on http://{shown}:{port}", flush=True)
    # uvicorn catches SIGINT/SIGTERM while it serves, then raises them again for the handlers it
    # found: with these, a signal after a clean shutdown ends nothing (exit 0).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        uv.run(sockets=[sock])  # SIGINT/SIGTERM: stop accepting, wait for connections in flight
    finally:
        engine.drain()  # what is still in a slot past the graceful timeout is cancelled
        engine.stop()
        worker.join(timeout=30)
        sock.close()
    print("jais2 serve: stopped", file=sys.stderr, flush=True)
    return 0


def warm_up(engine) -> None:
    """Compiles the steps (prompts up to 64 tokens, every batch size) and runs one short
    request, so that the first clients do not wait for compiles."""
    import threading

    from jais2_jax.serving.engine import Request
    engine.compile()
    done = threading.Event()

    def emit(event):
        if event[0] in ("done", "error"):
            done.set()

    worker = threading.Thread(target=engine.run, daemon=True)
    worker.start()
    engine.submit(Request(prompt_ids=[0], max_tokens=2, emit=emit))
    done.wait()
    engine.stop()
    worker.join()
    engine.stopping = False
