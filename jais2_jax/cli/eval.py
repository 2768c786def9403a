"""`jais2 eval --checkpoint DIR (--tasks a,b | --perplexity FILES)`: lm-evaluation-harness tasks
or token-level perplexity on a checkpoint.

Tasks run through lm-eval's `simple_evaluate` with our model (`jais2_jax.evaluation.lm.Jais2LM`);
lm-eval's table is printed and its results JSON written to `--output-path` (staged, renamed when
complete). Suites in `configs/eval/` (`arabic`, `english`) are task names too.
"""

from __future__ import annotations

import sys

DTYPES = ("float32", "bfloat16")


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="HF or Orbax checkpoint folder (with its tokenizer), or a hub id")
    parser.add_argument("--revision", default=None, help="hub revision when --checkpoint is an id")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--tasks", help="comma-separated lm-eval tasks / groups, or a suite of "
                                      "configs/eval (arabic, english)")
    what.add_argument("--perplexity", nargs="+", metavar="FILE",
                      help="text files or token-store folders: token-level perplexity")
    parser.add_argument("--split", default=None,
                        help="token store split for --perplexity (default: eval if it has "
                             "documents, else train)")
    parser.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAMLs")
    parser.add_argument("--limit", type=float, default=None,
                        help="documents per task (or a fraction below 1)")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward (default 16)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="context in tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--output-path", default=None, help="results JSON file to write")
    parser.add_argument("--force", action="store_true", help="replace an existing --output-path")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="default: bfloat16 on GPU/TPU, float32 on CPU")
    parser.add_argument("--mesh", default=None,
                        help="device mesh, e.g. fsdp or 1,-1,4 (data, fsdp, tensor); default: one "
                             "device")
    parser.add_argument("--apply-chat-template", action="store_true",
                        help="render prompts with the tokenizer's chat template")
    parser.add_argument("--quantize", choices=("int8", "fp8", "nf4"), default=None,
                        help="weight-only int8 / fp8 / nf4 projections, quantized while loading")
    parser.add_argument("--adapter", default=None, help="PEFT LoRA folder, merged on load")
    parser.add_argument("--bootstrap-iters", type=int, default=100000,
                        help="lm-eval's bootstrap resamples for standard errors (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="lm-eval's random seed")


def _check(args) -> None:
    from jais2_jax.evaluation.harness import check_limit
    limit = args.limit
    if limit is not None and limit >= 1:
        if not float(limit).is_integer():
            raise ValueError(f"--limit {limit}: a number of documents must be whole")
        limit = int(limit)
    if args.limit is not None:
        try:
            check_limit(limit)
        except ValueError:
            raise ValueError(f"--limit must be positive (documents per task, or a fraction in "
                             f"(0, 1)), got {args.limit:g}") from None
    args.limit = limit
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.bootstrap_iters < 0:
        raise ValueError(f"--bootstrap-iters must be >= 0, got {args.bootstrap_iters}")
    if args.tasks is not None and not [t for t in args.tasks.split(",") if t.strip()]:
        raise ValueError("--tasks is empty")


def run(args) -> int:
    import json
    import os

    from jais2_jax.utils.fsutil import check_output, write_text_atomic

    _check(args)
    if args.output_path is not None:
        check_output(args.output_path, args.force)
    from jais2_jax.checkpoint.hub import resolve_checkpoint
    checkpoint = resolve_checkpoint(args.checkpoint, revision=args.revision)

    from lm_eval.utils import handle_non_serializable, make_table

    from jais2_jax.evaluation.harness import run_tasks, task_manager
    from jais2_jax.evaluation.lm import Jais2LM
    from jais2_jax.evaluation.perplexity import perplexity

    tasks = None
    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        # Unknown names fail here, before the checkpoint loads.
        manager = task_manager(args.include_path)
        unknown = [t for t in tasks if t not in manager.all_tasks and not
                   (t.endswith((".yaml", ".yml")) and os.path.isfile(t))]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}: not an lm-eval task, group "
                             "or tag, nor a YAML under --include-path")
    lm = Jais2LM(checkpoint, dtype=args.dtype, mesh=args.mesh, quantize=args.quantize,
                 adapter=args.adapter, batch_size=args.batch_size, max_length=args.max_length)
    if args.perplexity is not None:
        result = perplexity(lm, args.perplexity, split=args.split)
        print(f"perplexity {result['perplexity']:.4f}  (mean NLL {result['nll']:.6f} nats/token, "
              f"{result['tokens']} tokens, {result['documents']} documents)")
        text = json.dumps(result, indent=2)
    else:
        results = run_tasks(lm, tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                            include_path=args.include_path,
                            apply_chat_template=args.apply_chat_template,
                            bootstrap_iters=args.bootstrap_iters, random_seed=args.seed)
        results.pop("samples", None)
        results["config"] = {**results.get("config", {}), "model": "jais2",
                             "model_args": {"checkpoint": checkpoint, "dtype": args.dtype,
                                            "mesh": args.mesh, "quantize": args.quantize,
                                            "adapter": args.adapter}}
        print(make_table(results))
        if "groups" in results:
            print(make_table(results, "groups"))
        if lm.truncated:
            print(f"note: {lm.truncated} request(s) exceeded the model's context of "
                  f"{lm.max_length} tokens and were truncated from the left", file=sys.stderr)
        text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    if args.output_path is not None:
        write_text_atomic(args.output_path, text + "\n")
        print(f"wrote {args.output_path}", file=sys.stderr)
    return 0
