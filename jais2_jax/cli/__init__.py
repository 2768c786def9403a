"""The `jais2` command line (see main.py)."""

from jais2_jax.cli.main import main

__all__ = ["main"]
