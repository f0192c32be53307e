"""Reductions inside a language model: the hooks, the per-forward state and the reduced KV cache."""
