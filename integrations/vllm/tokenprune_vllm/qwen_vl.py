"""Qwen2.5-VL and Qwen3-VL in vLLM with tokenprune's pre-LLM reduction, as Qwen2-VL (`qwen2_vl.py`'s mixins).

Qwen2.5-VL differs from Qwen2-VL in its vision tower (windowed attention) and its videos' time-scaled
M-RoPE ids (the model's own ids of the unreduced prompt, which the mixins renumber or keep): the mixins
serve its images and videos as they are. Qwen3-VL's tower returns, per merged token, the main feature
followed by its DeepStack features (one per deepstack vision layer, concatenated along the hidden
dimension), which the language model splits and adds after its first decoder layers. The strategy chooses
on the main features (what `tp.attach` gives it at layer 0) and the kept rows cut the DeepStack features
identically: a merged token carries its survivor's own, as `tp.attach` injects them. Its M-RoPE ids are
interleaved by the rotary embedding, not by the ids, so renumbering them is Qwen2-VL's rule. Its videos'
frames are timestamped (text between them): they are reduced with one budget per frame (`budget:
per_frame`), each frame's placeholders cut to its budget, and pass whole under one budget per video.
"""

from __future__ import annotations

import torch
from torch import Tensor
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)

from tokenprune_vllm.qwen2_vl import PrunedQwenVL, pruned_processing


@pruned_processing(Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo, Qwen2_5_VLDummyInputsBuilder)
class PrunedQwen2_5_VLForConditionalGeneration(PrunedQwenVL, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL returning each image's and video's kept embeddings, M-RoPE ids as the policy says."""

    family = "Qwen2.5-VL"


@pruned_processing(Qwen3VLMultiModalProcessor, Qwen3VLProcessingInfo, Qwen3VLDummyInputsBuilder)
class PrunedQwen3VLForConditionalGeneration(PrunedQwenVL, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL returning each image's and video's kept embeddings, with their DeepStack features."""

    family = "Qwen3-VL"
    frames_apart = True  # timestamp text between a video's frames

    def _kept(self, image: Tensor, grid_thw: list[int]) -> tuple[Tensor, Tensor]:
        """The strategy chooses on the main features [N, D]; the kept rows' DeepStack features follow them."""
        main, deepstack = image.split([self.visual_dim, self.multiscale_dim], dim=-1)
        features, index = super()._kept(main, grid_thw)
        return torch.cat([features, deepstack[index.to(deepstack.device)]], dim=-1), index
