"""tokenprune's vLLM plug-in: pre-LLM visual-token reductions served by vLLM."""
