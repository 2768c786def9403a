"""`jais2 export ORBAX_DIR HF_DIR`: Orbax checkpoint -> HF safetensors folder, streaming.

ORBAX_DIR may also be a training run's output_dir: its latest (or `--step`) checkpoint is exported,
with the tokenizer of the run's token store."""

from __future__ import annotations

from jais2_jax.cli.convert import DTYPES, interruptible


def add_arguments(parser) -> None:
    parser.add_argument("orbax_dir", help="folder written by `jais2 convert` (or the same layout), "
                                          "or a training run's output_dir")
    parser.add_argument("--step", type=int, default=None,
                        help="for a training run: the checkpoint step (default: the latest)")
    parser.add_argument("hf_dir", help="output folder for transformers' from_pretrained")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="dtype of the written tensors (default: as stored)")
    parser.add_argument("--force", action="store_true",
                        help="replace HF_DIR if it exists (only an HF checkpoint folder: "
                             "config.json and *.safetensors, or an empty folder)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    return interruptible("export", args.hf_dir, lambda: _export(args))


def _export(args) -> int:
    from jais2_jax.checkpoint import export_orbax_to_hf, return_freed_memory_to_os
    from jais2_jax.training.export import export_run_to_hf, is_training_run
    return_freed_memory_to_os()  # a process of its own: bound RSS (see the function)
    if is_training_run(args.orbax_dir):
        step = export_run_to_hf(args.orbax_dir, args.hf_dir, step=args.step,
                                max_shard_size=args.max_shard_size, dtype=args.dtype,
                                force=args.force, progress=not args.quiet)
        print(f"wrote {args.hf_dir} (step {step} of the run)")
        return 0
    if args.step is not None:
        raise ValueError(f"--step is for a training run's output_dir; {args.orbax_dir} is not one")
    export_orbax_to_hf(args.orbax_dir, args.hf_dir, max_shard_size=args.max_shard_size,
                       dtype=args.dtype, force=args.force, progress=not args.quiet)
    print(f"wrote {args.hf_dir}")
    return 0
