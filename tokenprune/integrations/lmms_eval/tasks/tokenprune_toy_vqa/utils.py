"""The task's functions where lmms-eval's `!function utils.NAME` looks (from `...lmms_eval.toy_task`)."""

from tokenprune.integrations.lmms_eval.toy_task import doc_to_text, doc_to_visual, process_results

__all__ = ["doc_to_text", "doc_to_visual", "process_results"]
