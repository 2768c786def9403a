"""Evaluation: lm-evaluation-harness on the jit steps, perplexity (issue 20)."""
