"""The Qwen-VL families in vLLM with tokenprune's pre-LLM reduction: fewer placeholders per image and video,
M-RoPE ids `renumbered` or `original`. The mixins here hold the logic; Qwen2-VL's classes below (Qwen2.5-VL's
and Qwen3-VL's in `qwen_vl.py`) put them before vLLM's own.

The processor puts each item's kept count of placeholders in the prompt (a function of the item's grid
and the config: `ImageReduction.item_kept_count`); the model returns that many embeddings per item
(`ImageReduction.select_kept`, the strategy code `tp.attach` runs, on a view of the image, or of the video
with its frames). vLLM computes a request's M-RoPE ids when the runner admits it, before the encoder
runs, in `get_mrope_input_positions`; which cells an item keeps depends on its pixels, so that method runs
the vision tower and the selection on the request's items itself (a second tower pass per item) and takes
the model's own ids of the unreduced prompt at the kept tokens: renumbered with tokenprune's own
`renumbered` (docs/positions.md), or as they are under `positions: original` (gaps where tokens left,
decode continuing after the unreduced prompt), as `tp.attach` does. vLLM's hook for this, EVS's
`recompute_mrope_positions`, is not used: vLLM 0.32 calls it only with its video pruning on, and its CPU
runner never. A family whose videos carry text between frames (Qwen3-VL's timestamps: `frames_apart`)
has each frame's placeholders cut to the frame's budget, so its videos are reduced under `budget:
per_frame` only and pass whole otherwise (`reduces_videos`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor
from vllm.config import MultiModalConfig, VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate, PromptUpdateDetails
from vllm.multimodal.processing.processor import PromptUpdateInfo

from tokenprune.core.language.positions import renumbered
from tokenprune.errors import ConfigError
from tokenprune_vllm.llava import configured
from tokenprune_vllm.reduction import Grid

# each modality's pixels in vLLM's multimodal inputs (also the `type` of its pixel inputs)
PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}
logger = init_logger(__name__)


def reduces_videos(frames_apart: bool) -> bool:
    """Whether a family's videos are reduced: always, or, where text stands between a video's frames
    (`frames_apart`: Qwen3-VL's timestamps), with one budget per frame only, since the processor counts each
    frame's placeholders before any pixel is seen."""
    return not frames_apart or configured().config.budget == "per_frame"


def placeholder(config: Any, modality: str) -> int:
    """The token id an item of `modality` repeats in the prompt, from the model's config."""
    return config.image_token_id if modality == "image" else config.video_token_id


class PrunedQwenVLProcessingInfo:
    """Mixin before a Qwen-VL processing info: each image's token count cut to the stage's budget."""

    def get_num_image_tokens(self, **kwargs: Any) -> int:
        return configured().kept_count(super().get_num_image_tokens(**kwargs))


class PrunedQwenVLMultiModalProcessor:
    """Mixin before a Qwen-VL processor: the model's own prompt updates, each image's and video's
    placeholders cut to its kept count (the family's own text around them, Qwen3-VL's video timestamps,
    untouched); a video's left whole where its model passes videos whole (`reduces_videos`)."""

    frames_apart: ClassVar[bool] = False  # the model's `PrunedQwenVL.frames_apart` (`pruned_processing`)

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, Any],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        config = self.info.get_hf_config()
        grid = partial(merged_grid, out_mm_kwargs, config.vision_config.spatial_merge_size)
        return [
            replace(
                update,
                replacement=partial(kept_placeholders, update, grid, placeholder(config, update.modality)),
            )
            if update.modality == "image" or reduces_videos(self.frames_apart)
            else update
            for update in updates
        ]


def merged_grid(out_mm_kwargs: MultiModalKwargsItems, merge: int, modality: str, item: int) -> Grid:
    """(T, H, W) merged tokens of a processed item: its `*_grid_thw` after the `merge` x `merge` merger."""
    frames, height, width = out_mm_kwargs[modality][item][f"{modality}_grid_thw"].data.tolist()
    return frames, height // merge, width // merge


def kept_placeholders(
    update: PromptReplacement, grid: Callable[[str, int], Grid], token: int, item: int
) -> PromptUpdateInfo:
    """`update`'s replacement of `item` cut to the item's kept count (`grid(modality, item)` its merged
    grid): one run of the placeholder `token` (an image's, a Qwen2-VL video's) cut to it; or, where text
    stands between a video's frames (Qwen3-VL's timestamps, a `PromptUpdateDetails`), each frame's run cut
    to the frame's budget (`budget: per_frame`), the text kept."""
    full = update.replacement(item)
    if isinstance(full, list):
        return full[: configured().item_kept_count(len(full), grid(update.modality, item))]
    budget = configured().item_budget(full.full.count(token), grid(update.modality, item))
    return PromptUpdateDetails.select_token_id(runs_cut(full.full, token, budget), token)


def runs_cut(tokens: list[int], token: int, budget: Sequence[int]) -> list[int]:
    """`tokens` with the i-th run of `token` cut to its first `budget[i]`, every other token kept."""
    runs, cut, left = iter(budget), [], 0
    for index, current in enumerate(tokens):
        if current == token and (index == 0 or tokens[index - 1] != token):
            left = next(runs)
        if current != token or left > 0:
            cut.append(current)
            left -= current == token
    return cut


def refuse_own_pruning(multimodal: MultiModalConfig, family: str) -> None:
    """Refuse vLLM's own video pruning (EVS, VidCom2) beside a tokenprune reduction: both would set the
    placeholder counts and the M-RoPE ids (its image embeddings would get position channels per token)."""
    if multimodal.is_multimodal_pruning_enabled():
        raise ConfigError(
            f"tokenprune-vllm cannot serve {family} with vLLM's own video pruning on (`video_pruning_rate` > "
            "0): both would cut the placeholders and number the M-RoPE ids; turn one of them off"
        )


class PrunedQwenVL:
    """Mixin before a vLLM Qwen-VL model: each item's kept embeddings, its M-RoPE ids as the policy says."""

    family: ClassVar[str]  # the family's name, in refusals
    frames_apart: ClassVar[bool] = False  # text between a video's frames (Qwen3-VL's timestamps)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        refuse_own_pruning(vllm_config.model_config.get_multimodal_config(), self.family)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if configured().in_vision_tower:
            raise ConfigError(
                f"tokenprune-vllm serves {self.family} with `layer: 0` reductions only; `site: vision` "
                "stages are served on LLaVA (docs/serving.md)"
            )
        if not self._reduces("video"):
            logger.warning(
                "tokenprune-vllm: %s's videos pass unreduced under one budget per video: their frames are "
                "timestamped, so each frame's kept count must be known before its pixels; `budget: "
                "per_frame` reduces them",
                self.family,
            )

    def _process_image_input(self, image_input: Any) -> tuple[Tensor, ...]:
        embeddings = super()._process_image_input(image_input)
        return self._kept_items(embeddings, image_input["image_grid_thw"])

    def _process_video_input(self, video_input: Any) -> tuple[Tensor, ...]:
        embeddings = super()._process_video_input(video_input)
        if not self._reduces("video"):
            return embeddings
        return self._kept_items(embeddings, video_input["video_grid_thw"])

    def _kept_items(self, embeddings: Sequence[Tensor], grids: Tensor) -> tuple[Tensor, ...]:
        """Each item's kept embeddings, from its embeddings and its [3] `*_grid_thw` row of `grids`."""
        return tuple(self._kept(item, grid)[0] for item, grid in zip(embeddings, grids.tolist(), strict=True))

    def _kept(self, item: Tensor, grid_thw: list[int]) -> tuple[Tensor, Tensor]:
        """One image's or video's kept embeddings and their [k] indices among its merged tokens."""
        merge = self.visual.spatial_merge_size
        frames, height, width = grid_thw
        return configured().select_kept(item, (frames, height // merge, width // merge))

    def _reduces(self, modality: str) -> bool:
        """Whether the items of `modality` are reduced (images always, videos unless passed whole)."""
        return modality == "image" or reduces_videos(self.frames_apart)

    def _kept_index(self, feature: MultiModalFeatureSpec, full: int) -> Tensor:
        """[k] the tokens a request's item keeps among its `full`: as `embed_multimodal` will select
        them (its tower run here too), or all of a video passed whole."""
        modality = feature.modality
        if not self._reduces(modality):
            return torch.arange(full)
        pixels = PIXELS[modality]
        if pixels not in feature.data:
            raise ConfigError(
                f"tokenprune-vllm reduces {self.family} {modality}s given as pixels, not as embeddings"
            )
        grid = feature.data[f"{modality}_grid_thw"].data
        inputs = {
            "type": pixels,
            pixels: feature.data[pixels].data.to(self.visual.device, self.visual.dtype),
            f"{modality}_grid_thw": grid[None],
        }
        encode = super()._process_image_input if modality == "image" else super()._process_video_input
        return self._kept(encode(inputs)[0], grid.tolist())[1].cpu()

    @torch.inference_mode()
    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[Tensor, int]:
        """The shortened prompt's [3, N] ids and the decode delta (the next id - N), from the model's own
        ids of the unreduced prompt: `renumbered` over the kept tokens by tokenprune's rule, decode
        continuing after the largest renumbered id; or `original`, the kept tokens' own ids (gaps where
        tokens left), decode continuing after the unreduced prompt's largest id."""
        tokens, features, segment, kept = self._unreduced(input_tokens, mm_features)
        own, _ = super().get_mrope_input_positions(tokens, features)
        own = own.long()
        if configured().positions == "original":
            return own[:, kept], int(own.max()) + 1 - len(input_tokens)
        real = torch.ones(1, len(tokens), dtype=torch.bool)
        positions = renumbered(own[:, None], segment[None], real, kept[None])[0][:, 0]
        return positions, int(positions.max()) + 1 - len(input_tokens)

    def _unreduced(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[list[int], list[MultiModalFeatureSpec], Tensor, Tensor]:
        """The unreduced prompt of a shortened one: its tokens, its items placed in it, each token's item
        (-1: text, Qwen3-VL's timestamps included) and the [N] indices in it of the shortened prompt's
        tokens."""
        tokens: list[int] = []
        features, segment, kept = [], [], []
        read = 0
        for item, feature in enumerate(sorted(mm_features, key=lambda f: f.mm_position.offset)):
            place = feature.mm_position
            text = input_tokens[read : place.offset]
            kept.append(torch.arange(len(text)) + len(tokens))
            tokens, segment = tokens + text, segment + [-1] * len(text)
            span = self._full_span(feature, input_tokens[place.offset : place.offset + place.length])
            cells = torch.tensor(span) == placeholder(self.config, feature.modality)
            chosen = cells.nonzero()[:, 0][self._kept_index(feature, int(cells.sum()))]
            kept.append(torch.cat([(~cells).nonzero()[:, 0], chosen]).sort().values + len(tokens))
            placed = replace(place, offset=len(tokens), length=len(span), is_embed=cells)  # the full span's
            features.append(replace(feature, mm_position=placed))
            tokens, segment = tokens + span, segment + torch.where(cells, item, -1).tolist()
            read = place.offset + place.length
        kept.append(torch.arange(len(input_tokens) - read) + len(tokens))
        tokens, segment = tokens + input_tokens[read:], segment + [-1] * (len(input_tokens) - read)
        return tokens, features, torch.tensor(segment), torch.cat(kept)

    def _full_span(self, feature: MultiModalFeatureSpec, span: list[int]) -> list[int]:
        """An item's tokens in the unreduced prompt, from its `span` in the shortened one: a reduced item's
        placeholder once per merged token; with text between a video's frames, each frame's run of them
        restored before its `<vision_end>` (a frame may have kept none); a video passed whole as it is."""
        if not self._reduces(feature.modality):
            return span
        token = placeholder(self.config, feature.modality)
        frames, height, width = feature.data[f"{feature.modality}_grid_thw"].data.tolist()
        per_frame = height * width // self.visual.spatial_merge_size**2
        if feature.modality == "image" or not self.frames_apart:
            return [token] * (frames * per_frame)
        full = []
        for current in span:
            full += [token] * per_frame if current == self.config.vision_end_token_id else []
            full += [] if current == token else [current]
        return full


def pruned_processing(processor: type, info: type, dummy_inputs: type) -> Callable[[type], type]:
    """vLLM's registration of a pruned Qwen-VL model's processing: its family's processor and processing
    info behind the mixins above (the processor cutting videos only where the model reduces them), its
    dummy inputs as they are."""

    def register(model: type) -> type:
        return MULTIMODAL_REGISTRY.register_processor(
            behind(PrunedQwenVLMultiModalProcessor, processor, frames_apart=model.frames_apart),
            info=behind(PrunedQwenVLProcessingInfo, info),
            dummy_inputs=dummy_inputs,
        )(model)

    return register


def behind(mixin: type, base: type, **attributes: Any) -> type:
    """The class `Pruned<base>`: `mixin`'s methods first, then vLLM's `base` (with `attributes` set)."""
    return type(f"Pruned{base.__name__}", (mixin, base), {"__module__": __name__, **attributes})


@pruned_processing(Qwen2VLMultiModalProcessor, Qwen2VLProcessingInfo, Qwen2VLDummyInputsBuilder)
class PrunedQwen2VLForConditionalGeneration(PrunedQwenVL, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL returning each image's and video's kept embeddings, M-RoPE ids as the policy says."""

    family = "Qwen2-VL"
