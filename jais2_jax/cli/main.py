"""`jais2` command line: one subcommand per module, each imported only when it runs.

Every command module defines `add_arguments(parser)` and `run(args) -> int`.

A command that fails on bad input or an unwritable / missing place (ValueError, OSError) prints one
line, `jais2 CMD: error: MSG`, and exits 1; `--verbose` (before or after the command) or
JAIS2_VERBOSE=1 adds the full traceback and the libraries' error logs. Any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

COMMANDS = {
    "convert": ("jais2_jax.cli.convert", "HF safetensors folder -> Orbax checkpoint"),
    "export": ("jais2_jax.cli.export", "Orbax checkpoint -> HF safetensors folder"),
    "generate": ("jais2_jax.cli.generate", "generate text from a checkpoint"),
    "train": ("jais2_jax.cli.train", "train from a run config (YAML)"),
    "prepare-data": ("jais2_jax.cli.prepare_data", "tokenize text/jsonl into a token store"),
    "plan": ("jais2_jax.cli.plan", "memory plan for a model, mesh and batch"),
    "demo": ("jais2_jax.cli.demo", "the embedded default: train a tiny model, then sample"),
    "eval": ("jais2_jax.cli.eval", "lm-evaluation-harness tasks or perplexity on a checkpoint"),
    "serve": ("jais2_jax.cli.serve", "OpenAI-compatible HTTP server with continuous batching"),
}
VERBOSE_ENV = "JAIS2_VERBOSE"
VERBOSE_HELP = (f"on failure, print the full traceback and the libraries' error logs (or set "
                f"{VERBOSE_ENV}=1)")
# Loggers whose ERROR records come with a failure that is reported anyway: Orbax logs every
# failed background write (e.g. out of space) with its traceback through absl, once per thread.
_LIBRARY_LOGGERS = ("absl",)
# Commands that hold those back (_Held) until they end: the ones that end soon. A training run
# may go on for days after a library logs an error, so `train` and `demo` let them through at once.
_HOLDING_COMMANDS = ("convert", "export", "generate", "prepare-data", "plan", "eval")


class _Held(logging.Filter):
    """While a command runs, holds back what libraries report on the side of a failure: the ERROR
    records of the library loggers, and exceptions raised where nobody can catch them (Python's
    "Exception ignored in ..." reports: e.g. TensorStore completing the reads Orbax abandoned
    after a failure, into an event loop already closed). Dropped when the command fails on a user
    error, whose one line says it all (and so are later such reports: the process is ending);
    passed on otherwise: nothing is lost when the command succeeds or a bug shows its traceback."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.unraisable: list = []
        self.report = sys.unraisablehook

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            self.records.append(record)
            return False
        return True

    def __enter__(self):
        for name in _LIBRARY_LOGGERS:
            logging.getLogger(name).addFilter(self)
        self.report = sys.unraisablehook
        sys.unraisablehook = self.unraisable.append
        return self

    def __exit__(self, *exc):
        for name in _LIBRARY_LOGGERS:
            logging.getLogger(name).removeFilter(self)
        sys.unraisablehook = self.report

    def release(self) -> None:
        records, self.records = self.records, []
        for record in records:
            logging.getLogger(record.name).handle(record)
        unraisable, self.unraisable = self.unraisable, []
        for report in unraisable:
            sys.unraisablehook(report)

    def drop(self) -> None:
        self.records, self.unraisable = [], []
        sys.unraisablehook = lambda report: None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0")
    while argv and argv[0] == "--verbose":  # the global flag, before the command
        verbose = True
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="jais2", description="Jais2 in JAX/Flax")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help or the "invalid choice" error and exits
        return 2
    name = argv[0]
    module_name, help_ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            print(f"jais2 {name}: not available in this build", file=sys.stderr)
            return 2
        raise
    cmd_parser = argparse.ArgumentParser(prog=f"jais2 {name}", description=help_)
    module.add_arguments(cmd_parser)
    cmd_parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    args = cmd_parser.parse_args(argv[1:])
    verbose = verbose or args.verbose
    held = _Held()
    try:
        if verbose or name not in _HOLDING_COMMANDS:
            rc = int(module.run(args) or 0)
        else:
            with held:
                rc = int(module.run(args) or 0)
    except (ValueError, OSError) as e:
        # Bad input or an unwritable / missing place: one clear line, no traceback.
        if verbose:
            traceback.print_exc()
        elif name in _HOLDING_COMMANDS:
            held.drop()
        print(f"jais2 {name}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except BaseException:
        held.release()  # a bug (or an interrupt): everything the libraries said, then its traceback
        raise
    held.release()
    return rc


if __name__ == "__main__":
    sys.exit(main())
