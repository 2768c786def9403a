"""Training: the token store, the run config, the loss/optimizer/step, the run loop, export of a run.

Modules are imported by name (`from jais2_jax.training.trainer import train`); this package's
import does no work."""
