"""`jais2 convert HF_DIR ORBAX_DIR`: HF safetensors folder -> Orbax checkpoint, streaming."""

from __future__ import annotations

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser) -> None:
    parser.add_argument("hf_dir", help="HF folder: config.json + *.safetensors (+ index, tokenizer)")
    parser.add_argument("orbax_dir", help="output folder (config.json, tokenizer files, params/)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="parameter dtype to store (default: as in the HF checkpoint)")
    parser.add_argument("--force", action="store_true", help="replace ORBAX_DIR if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from jais2_jax.checkpoint import convert_hf_to_orbax, return_freed_memory_to_os
    return_freed_memory_to_os()  # a process of its own: bound RSS (see the function)
    convert_hf_to_orbax(args.hf_dir, args.orbax_dir, dtype=args.dtype, force=args.force,
                        progress=not args.quiet)
    print(f"wrote {args.orbax_dir}")
    return 0
