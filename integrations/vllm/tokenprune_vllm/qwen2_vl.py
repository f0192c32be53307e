"""Qwen2-VL in vLLM with tokenprune's pre-LLM reduction: fewer placeholders per image, renumbered M-RoPE.

The processor puts each image's kept count of placeholders in the prompt; the model returns that many
embeddings per image (`ImageReduction.select_kept`, the strategy code `tp.attach` runs). vLLM computes a
request's M-RoPE ids when the runner admits it, before the encoder runs, in `get_mrope_input_positions`;
which cells an image keeps depends on its pixels, so that method runs the vision tower and the selection
on the request's images itself (a second tower pass per image) and renumbers the model's own ids of the
unreduced prompt with tokenprune's own `renumbered` (docs/positions.md), as `tp.attach` does. vLLM's
hook for this, EVS's `recompute_mrope_positions`, is not used: vLLM 0.32 calls it only with its video
pruning on, and its CPU runner never. Videos pass unreduced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import Tensor
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from tokenprune.core.language.positions import renumbered
from tokenprune.errors import ConfigError
from tokenprune_vllm.llava import configured

MODALITIES = ("image", "video")


def kept_tokens(modality: str, full: int) -> int:
    """Placeholders of an item with `full` merged tokens: an image's kept count, a video's all."""
    return configured().kept_count(full) if modality == "image" else full


class PrunedQwen2VLProcessingInfo(Qwen2VLProcessingInfo):
    """Qwen2-VL's processing info with each image's token count cut to the stage's budget."""

    def get_num_image_tokens(self, **kwargs: Any) -> int:
        return kept_tokens("image", super().get_num_image_tokens(**kwargs))


class PrunedQwen2VLMultiModalProcessor(Qwen2VLMultiModalProcessor):
    """Qwen2-VL's processor putting each image's kept count of placeholders in the prompt."""

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, Any],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        merge = self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size
        vocab = self.info.get_tokenizer().get_vocab()
        placeholder = {"image": vocab[processor.image_token], "video": vocab[processor.video_token]}

        def replacement(item: int, modality: str) -> list[int]:
            grid = out_mm_kwargs[modality][item][f"{modality}_grid_thw"].data
            return [placeholder[modality]] * kept_tokens(modality, int(grid.prod()) // merge**2)

        return [
            PromptReplacement(
                modality=modality,
                target=[placeholder[modality]],
                replacement=partial(replacement, modality=modality),
            )
            for modality in MODALITIES
        ]


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2VLMultiModalProcessor, info=PrunedQwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class PrunedQwen2VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL returning each image's kept embeddings, its prompts numbered `renumbered`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if configured().in_vision_tower:
            raise ConfigError(
                "tokenprune-vllm serves Qwen2-VL with `layer: 0` reductions only; `site: vision` stages "
                "are served on LLaVA (docs/serving.md)"
            )

    def _process_image_input(self, image_input: Any) -> tuple[Tensor, ...]:
        embeddings = super()._process_image_input(image_input)
        grids = image_input["image_grid_thw"].tolist()
        return tuple(self._kept(image, grid)[0] for image, grid in zip(embeddings, grids, strict=True))

    def _kept(self, image: Tensor, grid_thw: list[int]) -> tuple[Tensor, Tensor]:
        """One image's kept embeddings and their [k] indices among its merged tokens."""
        merge = self.visual.spatial_merge_size
        return configured().select_kept(image, (grid_thw[1] // merge, grid_thw[2] // merge))

    def _kept_index(self, feature: MultiModalFeatureSpec, full: int) -> Tensor:
        """[k] the tokens a request's item keeps among its `full`: an image's as `embed_multimodal` will
        select them (its tower run here too), a video's all."""
        if feature.modality != "image":
            return torch.arange(full)
        if "pixel_values" not in feature.data:
            raise ConfigError("tokenprune-vllm reduces Qwen2-VL images given as pixels, not as embeddings")
        grid = feature.data["image_grid_thw"].data
        pixels = feature.data["pixel_values"].data.to(self.visual.device, self.visual.dtype)
        image = super()._process_image_input(
            {"type": "pixel_values", "pixel_values": pixels, "image_grid_thw": grid[None]}
        )[0]
        return self._kept(image, grid.tolist())[1].cpu()

    @torch.inference_mode()
    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[Tensor, int]:
        """The shortened prompt's [3, N] `renumbered` ids and the decode delta (largest id + 1 - N): the
        model's own ids of the unreduced prompt, renumbered over the kept tokens by tokenprune's rule."""
        tokens, features, segment, kept = self._unreduced(input_tokens, mm_features)
        own, _ = super().get_mrope_input_positions(tokens, features)
        real = torch.ones(1, len(tokens), dtype=torch.bool)
        positions = renumbered(own.long()[:, None], segment[None], real, kept[None])[0][:, 0]
        return positions, int(positions.max()) + 1 - len(input_tokens)

    def _unreduced(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[list[int], list[MultiModalFeatureSpec], Tensor, Tensor]:
        """The unreduced prompt of a shortened one: its tokens, its items placed in it, each token's item
        (-1: text) and the [N] indices in it of the shortened prompt's tokens."""
        merge = self.visual.spatial_merge_size
        tokens: list[int] = []
        features, segment, kept = [], [], []
        read = 0
        for item, feature in enumerate(sorted(mm_features, key=lambda f: f.mm_position.offset)):
            place = feature.mm_position
            text = input_tokens[read : place.offset]
            kept.append(torch.arange(len(text)) + len(tokens))
            tokens, segment = tokens + text, segment + [-1] * len(text)
            full = int(feature.data[f"{feature.modality}_grid_thw"].data.prod()) // merge**2
            kept.append(self._kept_index(feature, full) + len(tokens))
            features.append(replace(feature, mm_position=replace(place, offset=len(tokens), length=full)))
            tokens, segment = tokens + [input_tokens[place.offset]] * full, segment + [item] * full
            read = place.offset + place.length
        kept.append(torch.arange(len(input_tokens) - read) + len(tokens))
        tokens, segment = tokens + input_tokens[read:], segment + [-1] * (len(input_tokens) - read)
        return tokens, features, torch.tensor(segment), torch.cat(kept)
