"""`jais2` command line: one subcommand per module, each imported only when it runs.

Every command module defines `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "convert": ("jais2_jax.cli.convert", "HF safetensors folder -> Orbax checkpoint"),
    "export": ("jais2_jax.cli.export", "Orbax checkpoint -> HF safetensors folder"),
    "generate": ("jais2_jax.cli.generate", "generate text from a checkpoint"),
    "train": ("jais2_jax.cli.train", "train from a run config (YAML)"),
    "prepare-data": ("jais2_jax.cli.prepare_data", "tokenize text/jsonl into a token store"),
    "plan": ("jais2_jax.cli.plan", "memory plan for a model, mesh and batch"),
    "demo": ("jais2_jax.cli.demo", "the embedded default: train a tiny model, then sample"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="jais2", description="Jais2 in JAX/Flax")
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
    args = cmd_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except (ValueError, OSError) as e:
        # Bad input or an unwritable / missing place: one clear line, no traceback.
        print(f"jais2 {name}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
