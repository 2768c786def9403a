"""`jais2 convert HF_DIR ORBAX_DIR`: HF safetensors folder -> Orbax checkpoint, streaming."""

from __future__ import annotations

import logging

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser) -> None:
    parser.add_argument("hf_dir", help="HF folder: config.json + *.safetensors (+ index, "
                        "tokenizer), or a Hugging Face model id (org/name) resolved through the "
                        "hub cache (HF_HOME; HF_HUB_OFFLINE=1: the cache only)")
    parser.add_argument("orbax_dir", help="output folder (config.json, tokenizer files, params/)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="parameter dtype to store (default: as in the HF checkpoint)")
    parser.add_argument("--revision", default=None,
                        help="branch, tag or commit of a Hugging Face model id (default: main)")
    parser.add_argument("--force", action="store_true",
                        help="replace ORBAX_DIR if it exists (only an Orbax model folder: "
                             "config.json and params/, or an empty folder)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _caused_by_stop(exc) -> bool:
    from jais2_jax.utils.fsutil import StopWriting
    for _ in range(20):
        if exc is None:
            return False
        if isinstance(exc, StopWriting):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class _DropStoppedWriterLogs(logging.Filter):
    """Drops the error logs (with tracebacks, via absl) of Orbax's writer threads stopped by an
    interrupt (fsutil.StopWriting): the command reports the interrupt in one line."""

    def filter(self, record):
        return not (record.exc_info and _caused_by_stop(record.exc_info[1]))


_DROP_STOPPED_WRITER_LOGS = _DropStoppedWriterLogs()


def interruptible(command: str, output: str, work) -> int:
    """`work()` with SIGINT and SIGTERM raising in the main thread (fsutil.interrupt_on_signals),
    so the staged output's temporary folder is removed (after the writer threads stopped); then
    one line, and the shell's exit status for the signal (128 + its number)."""
    import sys

    from jais2_jax.utils.fsutil import Interrupted, interrupt_on_signals
    # Kept for the rest of the process: those logs may be passed on after the command returns.
    logging.getLogger("absl").addFilter(_DROP_STOPPED_WRITER_LOGS)
    try:
        with interrupt_on_signals():
            return work()
    except Interrupted as e:
        print(f"jais2 {command}: interrupted by {e.name}; {output} was not written (or was "
              "left as it was)", file=sys.stderr)
        return 128 + e.signum


def run(args) -> int:
    from jais2_jax.checkpoint import convert_hf_to_orbax, return_freed_memory_to_os
    from jais2_jax.checkpoint.hub import resolve_checkpoint
    hf_dir = resolve_checkpoint(args.hf_dir, args.revision)
    return_freed_memory_to_os()  # a process of its own: bound RSS (see the function)

    def work():
        convert_hf_to_orbax(hf_dir, args.orbax_dir, dtype=args.dtype, force=args.force,
                            progress=not args.quiet)
        print(f"wrote {args.orbax_dir}")
        return 0
    return interruptible("convert", args.orbax_dir, work)
