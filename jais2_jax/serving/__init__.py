"""Serving: continuous-batching engine and the OpenAI-compatible HTTP server (issue 21)."""
