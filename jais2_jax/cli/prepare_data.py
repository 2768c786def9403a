"""`jais2 prepare-data INPUT... --tokenizer DIR --output DIR`: text / jsonl -> token store."""

from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("inputs", nargs="+",
                        help=".txt (blank lines separate documents) or .jsonl ({'text': ...}, "
                             "{'prompt': ..., 'completion': ...} or {'messages': [{'role': ..., "
                             "'content': ...}, ...]} per line: chat rendered with the tokenizer's "
                             "chat template, trained on the assistant turns) files or directories")
    parser.add_argument("--tokenizer", required=True,
                        help="directory with tokenizer.json (+ tokenizer_config.json for bos/eos)")
    parser.add_argument("--output", required=True, help="token store directory to create")
    parser.add_argument("--eval-fraction", type=float, default=0.0,
                        help="share of documents held out as the eval split (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the eval split choice")
    parser.add_argument("--text-key", default="text", help="jsonl field holding the text")
    parser.add_argument("--no-bos", action="store_true", help="do not prepend bos to documents")
    parser.add_argument("--no-eos", action="store_true",
                        help="do not append eos to documents (a tokenizer without an eos token is "
                             "refused unless this is given)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def run(args) -> int:
    from jais2_jax.training.data import prepare_data
    index = prepare_data(args.inputs, args.tokenizer, args.output, eval_fraction=args.eval_fraction,
                         seed=args.seed, text_key=args.text_key, add_bos=not args.no_bos,
                         add_eos=not args.no_eos, overwrite=args.overwrite)
    splits = ", ".join(f"{name}: {s['num_documents']} documents, {s['num_tokens']} tokens"
                       for name, s in index["splits"].items())
    print(f"wrote {args.output} ({splits})")
    return 0
