"""Subcommands of the `jais2` CLI (see jais2_jax/cli.py)."""
