"""`jais2 generate --checkpoint DIR (--prompt TEXT | --chat)`: stream generated text to stdout.

The checkpoint is an HF folder or one of our Orbax folders (with its tokenizer files). `--chat`
reads one user message per line from stdin, renders the conversation with the tokenizer's chat
template and streams each reply; the conversation ends at end of input.
"""

from __future__ import annotations

import sys

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_NEW_TOKENS = 256
SEED_LIMIT = 2 ** 63  # seeds are in [0, 2**63): what a jax.random key takes as a signed 64-bit int


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="HF or Orbax checkpoint folder, or a Hugging Face model id")
    parser.add_argument("--revision", default=None,
                        help="branch, tag or commit of a Hugging Face model id (default: main)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text to continue")
    what.add_argument("--chat", action="store_true", help="chat: one user message per stdin line")
    parser.add_argument("--system", default=None, help="system message for --chat")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"default: {DEFAULT_NEW_TOKENS}, or fewer where the prompt leaves less "
                             "room in the model's max_position_embeddings")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default) = greedy; below 1e-5 also greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed in [0, 2**63) (same seed, same text)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="compute and parameter dtype (default: bfloat16 on GPU/TPU, else "
                             "float32)")
    parser.add_argument("--quantize", choices=("int8", "fp8", "nf4"), default=None,
                        help="weight-only int8 / fp8 projections with per-channel scales, or nf4 "
                             "(QLoRA's 4-bit NormalFloat, a scale per 64 inputs), quantized "
                             "while loading (the values are converted to the compute dtype for "
                             "the GEMM on every device: no fp8 tensor cores needed)")
    parser.add_argument("--adapter", default=None,
                        help="a PEFT LoRA adapter folder (adapter_config.json + "
                             "adapter_model.safetensors), merged into the weights while loading")
    parser.add_argument("--cache-dtype", choices=("auto", "int8"), default="auto",
                        help="KV cache: the compute dtype (auto) or int8 with per-head scales")


class TextStream:
    """Prints one row's text as its tokens arrive; holds back an incomplete UTF-8 character.

    One instance serves every reply (`reset` between them): the callback is part of what the
    decode loop is compiled for, so a new callable would compile it again."""

    def __init__(self, tokenizer, stop_ids, out=None):
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.out = sys.stdout if out is None else out
        self.reset()

    def reset(self) -> None:
        self.ids: list[int] = []
        self.printed = ""
        self.done = False

    def __call__(self, step, tokens) -> None:
        token = int(tokens[0])
        if self.done:
            return
        if token in self.stop_ids:
            self.done = True
            return
        self.ids.append(token)
        self._emit(final=False)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if (final or not text.endswith("\ufffd")) and text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def finish(self) -> str:
        self._emit(final=True)
        self.out.write("\n")
        self.out.flush()
        return self.printed


def run(args) -> int:
    import jax

    from jais2_jax import Jais2ForCausalLM, Tokenizer, load_checkpoint, unstack_layers
    from jais2_jax.inference.generate import generate
    from jais2_jax.inference.sampling import Sampler
    from jais2_jax.model.options import ModelOptions

    # Cheap checks first: a bad flag should not wait for the checkpoint to load.
    Sampler(args.temperature, args.top_k, args.top_p)
    if not 0 <= args.seed < SEED_LIMIT:
        raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.max_new_tokens is not None and args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.prompt is not None and not args.prompt:
        raise ValueError("--prompt is empty")
    from jais2_jax.checkpoint.hub import resolve_checkpoint
    args.checkpoint = resolve_checkpoint(args.checkpoint, args.revision)
    tokenizer = Tokenizer.from_pretrained(args.checkpoint)
    if args.chat and tokenizer.chat_template is None:
        raise ValueError(f"{args.checkpoint}: the tokenizer has no chat template; use --prompt")
    prompt_ids = None if args.prompt is None else tokenizer.encode(args.prompt)  # before the load

    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    config, params = load_checkpoint(args.checkpoint, dtype=dtype, quantize=args.quantize,
                                     adapter=args.adapter)
    # Per-layer weights on accelerators: slicing a stacked weight inside jit copies it each step.
    per_layer = jax.default_backend() != "cpu"
    # There also q/k/v as one GEMM (one device: this command does not shard).
    model = Jais2ForCausalLM(config, dtype=dtype, param_dtype=dtype, quantization=args.quantize,
                             options=ModelOptions(scan_layers=not per_layer, fuse_qkv=per_layer))
    cache_dtype = "int8" if args.cache_dtype == "int8" else None
    if per_layer:
        params = unstack_layers(params, fuse_qkv=True)
    # Stop at the config's eos ids, those of generation_config.json (what transformers' generate
    # stops at; instruct checkpoints often list more there) and the tokenizer's eos (a chat
    # template may end turns with it).
    stop_ids = list(config.eos_token_ids)
    from jais2_jax.model.config import generation_eos_ids
    for extra in generation_eos_ids(args.checkpoint) + [tokenizer.eos_token_id]:
        if extra is not None and extra not in stop_ids:
            stop_ids.append(extra)
    rng = jax.random.key(args.seed)
    stream = TextStream(tokenizer, stop_ids)

    def reply(ids: list[int]) -> str:
        stream.reset()
        # Unless asked for a number: what the context leaves, up to the default.
        room = config.max_position_embeddings - len(ids)
        if args.max_new_tokens is None and room < 1:
            raise ValueError(f"the prompt ({len(ids)} tokens) fills the model's "
                             f"{config.max_position_embeddings} positions: nothing left to generate")
        new = args.max_new_tokens or min(DEFAULT_NEW_TOKENS, room)
        generate(model, params, [ids], max_new_tokens=new,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 eos_token_id=stop_ids, rng=rng, callback=stream, cache_dtype=cache_dtype)
        return stream.finish()

    if not args.chat:
        reply(prompt_ids)
        return 0
    messages = [] if args.system is None else [{"role": "system", "content": args.system}]
    for turn, line in enumerate(_user_lines()):
        messages.append({"role": "user", "content": line})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        rng = jax.random.fold_in(jax.random.key(args.seed), turn)
        messages.append({"role": "assistant", "content": reply(ids)})
    return 0


def _user_lines():
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")
