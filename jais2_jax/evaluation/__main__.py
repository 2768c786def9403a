"""`python -m jais2_jax.evaluation --model jais2 --model_args checkpoint=DIR --tasks ...`: lm-eval's
own command line with our model registered (lm-eval 0.4.13 finds models only in its own table or
among classes already imported: it has no plugin entry point for a package to register itself)."""

import sys

from lm_eval.__main__ import cli_evaluate

import jais2_jax.evaluation.lm  # noqa: F401  (registers "jais2")

if __name__ == "__main__":
    sys.exit(cli_evaluate())
