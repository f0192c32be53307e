"""LLaVA-1.5 in vLLM with tokenprune's pre-LLM reduction: fewer placeholders per image, the kept features.

The processing info tells vLLM's front-end each image's kept count (the budget of the configured stage),
so the scheduler, the KV cache and the positions see the shortened prompt; the model returns exactly
that many embeddings per image, chosen by the strategy's own `select` (`ImageReduction.select`). The
language model then numbers the shortened prompt contiguously: tokenprune's `positions: renumbered`.
"""

from __future__ import annotations

from torch import Tensor, nn
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaImageInputs,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import InputProcessingContext

from tokenprune.core.grid import GridTokens, check_site_layers
from tokenprune.errors import ConfigError
from tokenprune_vllm.reduction import ImageReduction, active_reduction


def configured() -> ImageReduction:
    """The process's reduction; the plug-in registers these classes only when one is configured."""
    reduction = active_reduction()
    if reduction is None:
        raise ConfigError("tokenprune-vllm's LLaVA class runs only with TOKENPRUNE_VLLM_CONFIG set")
    return reduction


class PrunedLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA's processing info with each image's placeholder count cut to the stage's budget."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        full = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        class_token = int(self.get_hf_config().vision_feature_select_strategy == "full")
        return configured().kept_count(full, prefix=class_token)


def pruned_llava_info(ctx: InputProcessingContext) -> PrunedLlavaProcessingInfo:
    """The processing info of a pruned LLaVA (CLIP or SigLIP towers; Pixtral's variable grids are refused)."""
    vision = ctx.get_hf_config().vision_config
    if vision.model_type == "pixtral":
        raise ConfigError(
            "tokenprune-vllm prunes LLaVA-1.5 style models (one fixed grid per image), not Pixtral"
        )
    return PrunedLlavaProcessingInfo(ctx)


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor, info=pruned_llava_info, dummy_inputs=LlavaDummyInputsBuilder
)
class PrunedLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA returning each image's kept (or merged) embeddings only.

    A layer-0 stage picks among each image's projected features; a `site: vision` stage reduces the CLIP
    layer's output in place (hooks on vLLM's own tower, the state of `tp.attach`'s vision site), so the
    later tower layers and the projector see the kept tokens only.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        if configured().positions == "original":
            raise ConfigError(
                "tokenprune-vllm cannot serve LLaVA with `positions: original`: a LLaVA language model "
                "takes 1-D positions, which vLLM numbers itself for every scheduled token (contiguously "
                "per request, decode continuing from the shortened prompt's length), and it gives the "
                "model no way to put gaps in one request's positions: set `positions: renumbered` "
                "(M-RoPE models such as Qwen2-VL supply their positions, and serve `original`)"
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vision_tokens: GridTokens | None = None  # the tower run in progress, for a vision stage
        if configured().in_vision_tower:
            self._watch_vision_tower()

    def _watch_vision_tower(self) -> None:
        """Capture queries and keys of the layers the stage reads; reduce the stage layer's output."""
        reduction = configured()
        layers = self.vision_tower.vision_model.encoder.layers
        check_site_layers((reduction.stage,), len(layers), "vision layer feeding the projector")
        for index in {reduction.stage.layer, *reduction.retained()}:
            layers[index].self_attn.qkv_proj.register_forward_hook(
                self._capture(index, layers[index].self_attn)
            )
        layers[reduction.stage.layer].register_forward_hook(self._reduce)

    def _capture(self, index: int, attention: nn.Module):
        def hook(module: nn.Module, args: tuple, out: tuple[Tensor, Tensor | None]) -> None:
            for name, value in zip(("queries", "keys"), out[0].chunk(3, dim=-1)[:2], strict=True):
                heads = value.view(*value.shape[:2], attention.num_heads_per_partition, attention.head_dim)
                self.vision_tokens.capture(index, name, heads.transpose(1, 2))

        return hook

    def _reduce(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        return self.vision_tokens.reduce(configured().stage, out, module.self_attn.scale)

    def _process_image_pixels(self, inputs: LlavaImageInputs) -> Tensor | tuple[Tensor, ...]:
        if not configured().in_vision_tower:
            return super()._process_image_pixels(inputs)
        self.vision_tokens = configured().grid_tokens(self.patch_grid())
        try:
            return super()._process_image_pixels(inputs)
        finally:
            self.vision_tokens = None

    def _process_image_input(self, image_input: LlavaImageInputs) -> Tensor | tuple[Tensor, ...]:
        embeddings = super()._process_image_input(image_input)
        reduction = configured()
        if isinstance(image_input, LlavaImageEmbeddingInputs) or reduction.in_vision_tower:
            return embeddings  # reduced in the tower, or given: counted as given, taken as already reduced
        grid = self.patch_grid()
        return tuple(reduction.select(image, grid) for image in embeddings)

    def patch_grid(self) -> tuple[int, int]:
        """(H, W) patches of one image."""
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side
