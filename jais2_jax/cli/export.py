"""`jais2 export ORBAX_DIR HF_DIR`: Orbax checkpoint -> HF safetensors folder, streaming.

ORBAX_DIR may also be a training run's output_dir: its latest (or `--step`) checkpoint is exported,
with the tokenizer of the run's token store. A LoRA run's output_dir is exported as a PEFT adapter
folder (adapter_config.json + adapter_model.safetensors, for `peft.PeftModel.from_pretrained`), or
with `--merge` as an HF folder of its base with the adapter merged into the weights."""

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
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--adapter-only", action="store_true",
                      help="write a PEFT adapter folder (the default for a LoRA run; any other "
                           "checkpoint is refused)")
    lora.add_argument("--merge", action="store_true",
                      help="a LoRA run: write an HF folder of the base (the run's init_from) with "
                           "the adapter merged into the weights")


def run(args) -> int:
    return interruptible("export", args.hf_dir, lambda: _export(args))


def _export(args) -> int:
    from jais2_jax.checkpoint import export_orbax_to_hf, return_freed_memory_to_os
    from jais2_jax.training.export import (
        export_run_adapter,
        export_run_merged,
        export_run_to_hf,
        is_training_run,
    )
    from jais2_jax.training.lora import is_lora_run
    return_freed_memory_to_os()  # a process of its own: bound RSS (see the function)
    run = is_training_run(args.orbax_dir)
    if (args.adapter_only or args.merge) and not run:
        flag = "--adapter-only" if args.adapter_only else "--merge"
        raise ValueError(f"{flag} is for a LoRA training run's output_dir; {args.orbax_dir} is not "
                         "a training run (it holds full weights, not an adapter)")
    if run and (args.adapter_only or args.merge or is_lora_run(args.orbax_dir)):
        if args.merge:
            step = export_run_merged(args.orbax_dir, args.hf_dir, step=args.step,
                                     max_shard_size=args.max_shard_size, dtype=args.dtype,
                                     force=args.force, progress=not args.quiet)
            print(f"wrote {args.hf_dir} (step {step} of the LoRA run, merged into its base)")
            return 0
        if args.dtype is not None:
            raise ValueError("--dtype is for an HF folder; a PEFT adapter is written in float32 "
                             "(pass --merge for an HF folder)")
        step = export_run_adapter(args.orbax_dir, args.hf_dir, step=args.step, force=args.force)
        print(f"wrote {args.hf_dir} (a PEFT adapter: step {step} of the LoRA run)")
        return 0
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
