"""Qwen2.5-VL and Qwen3-VL under a configured reduction: refused at engine start, saying why.

Without these classes such a checkpoint served with `TOKENPRUNE_VLLM_CONFIG` set would run unreduced,
silently. Qwen2-VL is served (`tokenprune_vllm/qwen2_vl.py`); these two need the same subclass and their
own parity tests: docs/serving.md, "Qwen2-VL, Qwen2.5-VL and Qwen3-VL".
"""

from __future__ import annotations

from typing import Any

from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

from tokenprune.errors import ConfigError

REASON = (
    "tokenprune-vllm does not serve {family} with a reduction yet (only LLaVA-1.5 and Qwen2-VL): its "
    "kept placeholder counts and renumbered M-RoPE ids are not implemented for it; unset "
    "TOKENPRUNE_VLLM_CONFIG to serve it unreduced "
    "(docs/serving.md, 'Qwen2-VL, Qwen2.5-VL and Qwen3-VL')"
)


def refused(base: type, family: str) -> type:
    """A subclass of vLLM's `base` whose construction (at engine start, before weights load) raises the
    refusal for `family`."""

    def __init__(self, **kwargs: Any) -> None:
        raise ConfigError(REASON.format(family=family))

    return type(f"Refused{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})


RefusedQwen2_5_VL = refused(Qwen2_5_VLForConditionalGeneration, "Qwen2.5-VL")
RefusedQwen3VL = refused(Qwen3VLForConditionalGeneration, "Qwen3-VL")
