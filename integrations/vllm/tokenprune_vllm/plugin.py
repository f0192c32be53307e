"""vLLM general plug-in entry point: registers tokenprune's pruning-capable model classes.

vLLM calls `register` in every process it starts (the `vllm.general_plugins` entry point). Without
`TOKENPRUNE_VLLM_CONFIG` nothing is registered and vLLM runs its own classes; with it, the config is
checked first, so a reduction vLLM cannot carry stops the engine before it starts, saying why.
"""

from __future__ import annotations

from tokenprune_vllm.reduction import active_reduction

# vLLM architecture name -> "module:Class" of the subclass that prunes its visual tokens.
PRUNED_MODELS = {
    "LlavaForConditionalGeneration": "tokenprune_vllm.llava:PrunedLlavaForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "tokenprune_vllm.qwen2_vl:PrunedQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "tokenprune_vllm.qwen_vl:PrunedQwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "tokenprune_vllm.qwen_vl:PrunedQwen3VLForConditionalGeneration",
}


def register() -> None:
    """Replace vLLM's model classes with tokenprune's subclasses when a reduction is configured."""
    if active_reduction() is None:
        return
    from vllm import ModelRegistry  # imported here: the module stays importable where vLLM is absent

    for architecture, target in PRUNED_MODELS.items():
        ModelRegistry.register_model(architecture, target)
