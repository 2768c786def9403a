"""`python -m jais2_jax.cli ...`: the `jais2` command."""

import sys

from jais2_jax.cli.main import main

sys.exit(main())
