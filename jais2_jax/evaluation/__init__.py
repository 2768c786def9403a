"""Evaluation: lm-evaluation-harness on the jit steps, perplexity (issue 20).

`lm.Jais2LM` is the lm-eval model (registered as "jais2" when `jais2_jax.evaluation.lm` is
imported), `harness.evaluate_tasks` runs tasks on parameters in memory, `perplexity.perplexity`
scores text files or a token store. Import the submodules: this package imports nothing itself
(lm-eval is heavy)."""
