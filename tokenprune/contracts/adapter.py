"""The adapter contract: everything tokenprune needs to know about one model family, and nothing else.

An adapter finds the visual tokens in a batch, names the decoder layers and their attention
modules, and says which configuration holds the attention backend. It knows no strategy; the
core (`tokenprune.core`) drives the layers with its shared mechanics: `tokenprune.api.attach` picks the
driver for each kind of adapter (`Adapter`: a language model's layers; `EncoderAdapter`: a ViT's blocks).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tokenprune.contracts.layout import VisualLayout
from tokenprune.contracts.probe import ProjectionProbe
from tokenprune.errors import InputError

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class BaseAdapter(ABC):
    """Root of every adapter: registered under `name`, chosen for `model_types` automatically.

    `Adapter` describes a vision-language model (reductions inside its language model);
    `EncoderAdapter` a vision transformer (reductions inside its blocks).
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        """Whether this adapter handles `model` (by its config's `model_type`)."""
        return getattr(getattr(model, "config", None), "model_type", None) in cls.model_types


class Adapter(BaseAdapter):
    """Base class of vision-language model adapters: the language model's layers and visual tokens."""

    @abstractmethod
    def entry_module(self) -> nn.Module:
        """The module whose forward receives the input ids and image inputs of every call."""

    @abstractmethod
    def decoder_layers(self) -> Sequence[nn.Module]:
        """The language model's decoder layers, in order."""

    @abstractmethod
    def text_config(self) -> PretrainedConfig:
        """The language model's configuration (its `_attn_implementation` picks the mask format)."""

    @abstractmethod
    def visual_layout(self, inputs: dict[str, Any]) -> VisualLayout | None:
        """Where the visual tokens are, from the entry module's keyword inputs; None when there are none."""

    def input_ids(self, inputs: dict[str, Any]) -> Tensor:
        """[B, N] the token ids of the entry module's keyword `inputs`, where visual tokens are found.

        This default needs `input_ids`; override to also locate placeholders in `inputs_embeds`.
        """
        ids = inputs.get("input_ids")
        if ids is None:
            raise InputError(
                f"adapter {self.name!r} locates visual tokens in `input_ids`: pass them, not `inputs_embeds`"
            )
        return ids

    def attention_module(self, layer: int) -> nn.Module:
        """The self-attention module of decoder layer `layer`."""
        return self.decoder_layers()[layer].self_attn

    def probe(self, layer: int) -> ProjectionProbe:
        """What recomputes attention scores at `layer` (override for non-Llama-style attention)."""
        return ProjectionProbe(self.attention_module(layer))

    def input_norm(self, layer: int) -> nn.Module:
        """The norm decoder layer `layer` applies to its input before attention (pre-norm layout)."""
        return self.decoder_layers()[layer].input_layernorm

    def final_norm(self) -> nn.Module | None:
        """The language model's norm after its last layer, before the LM head; None where unknown.

        Without it the `normed_output` signal is unavailable.
        """
        return None

    no_vision_tower: ClassVar[str] = "it does not describe its vision encoder"  # why vision_towers() is empty

    def vision_towers(self) -> tuple[VisionTower, ...]:
        """The vision encoders that `site: vision` stages reduce (each its own items), or none, saying why
        in `no_vision_tower`."""
        return ()

    def rotary_embedding(self) -> nn.Module | None:
        """The language model's rotary module, `module(hidden, position_ids) -> (cos, sin)`: the tables its
        decoder layers receive, recomputed through it for `renumbered` positions; None where there is none
        (the `renumbered` policy is then refused)."""
        return None

    def bidirectional_blocks(self, visual: Tensor) -> Tensor | None:
        """[B, N] the block of tokens that attend to each other both ways (-1: a causal token), given
        the visual tokens `visual` [B, N] of a prefill, as the model's own mask groups them (Gemma 3:
        each image); None (this default): causal everywhere. The core keeps each block's kept tokens."""
        return None

    def continued_position_ids(self, positions: Tensor, inputs: dict[str, Any]) -> Tensor:
        """Position ids of new tokens at sequence `positions` [1, q] after a prompt reduced at layer 0.

        The core passes them when the caller gave none (a hand-written decode loop after a layer-0 site):
        `positions` count from the original prompt length, not from layer 0's shorter cache. The default
        gives them as they are (1-D, Llama-style); override for a model whose positions are offset or of
        another rank (Qwen2-VL's 3-D M-RoPE).
        """
        return positions


class ConditionalGenerationAdapter(Adapter):
    """The common case of transformers 5.x: `XForConditionalGeneration.model.language_model.layers`.

    The base model (`XModel`, reached through `.model` or given directly) receives the input ids
    and image inputs of every call and holds the language model: subclasses only describe where
    the visual tokens are (`visual_layout`).
    """

    def base_model(self) -> nn.Module:
        """The `XModel` inside a `...ForConditionalGeneration`, or the model itself."""
        return getattr(self.model, "model", self.model)

    def entry_module(self) -> nn.Module:
        return self.base_model()

    def decoder_layers(self) -> Sequence[nn.Module]:
        return self.base_model().language_model.layers

    def text_config(self) -> PretrainedConfig:
        return self.base_model().language_model.config

    def final_norm(self) -> nn.Module | None:
        return self.base_model().language_model.norm

    def rotary_embedding(self) -> nn.Module | None:
        return getattr(self.base_model().language_model, "rotary_emb", None)

    def placeholder_token_ids(self) -> tuple[int, ...]:
        """The ids of the visual placeholder tokens: the config's `image_token_id` and `video_token_id`."""
        config = self.model.config
        ids = (getattr(config, name, None) for name in ("image_token_id", "video_token_id"))
        return tuple(token for token in ids if token is not None)

    def input_ids(self, inputs: dict[str, Any]) -> Tensor:
        """The `input_ids`, or with `inputs_embeds` ids recovered as the model itself finds its placeholders.

        A position whose embedding equals a placeholder token's embedding exactly gets that token's id
        (the models' own `get_placeholder_mask`); every other position gets -1 (text, unknown id).
        """
        ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
        if ids is not None or embeds is None:
            return super().input_ids(inputs)
        embedding = self.base_model().get_input_embeddings()
        recovered = torch.full(embeds.shape[:2], -1, dtype=torch.long, device=embeds.device)
        with torch.no_grad():
            for token in self.placeholder_token_ids():
                reference = embedding(torch.full((), token, dtype=torch.long, device=embeds.device))
                recovered.masked_fill_((embeds == reference.to(embeds.device)).all(-1), token)
        return recovered


@dataclass(frozen=True)
class VisionTower:
    """What an adapter exposes of one vision encoder for `site: vision` stages.

    `layers`: encoder layers whose `self_attn` has `q_proj`, `k_proj`, `num_heads`, `head_dim` and
    `scale`, each returning its hidden states; `feature_layer`: the layer whose output feeds the
    projector (LLaVA's `vision_feature_layer=-2`: the penultimate); `prefix_tokens`: leading tokens
    (the class token), never reduced; `projector`: its input is [items, tokens, D]. The features of
    item i fill the i-th run of `placeholder_id` tokens of the batch (row-major): the patches only, or
    with `keeps_prefix` the prefix tokens too (Video-LLaVA's video frames keep their class token).
    """

    layers: Sequence[nn.Module]
    feature_layer: int
    prefix_tokens: int
    grid: tuple[int, int]
    projector: nn.Module
    placeholder_id: int
    keeps_prefix: bool = False
    modality: str = "image"  # its key in `mm_encoder_outputs`, where generate() passes the encoded items

    @property
    def tokens_per_item(self) -> int:
        """Placeholders one item (an image, a frame) fills in the language model's input."""
        return self.grid[0] * self.grid[1] + (self.prefix_tokens if self.keeps_prefix else 0)

    def slots(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(item, token) [B, N] of each placeholder of this tower: its vision-batch item and token index
        in the tower's sequence (prefix included); -1 elsewhere. Placeholders fill row-major."""
        placeholders = input_ids == self.placeholder_id
        order = torch.cumsum(placeholders.flatten(), 0).view_as(input_ids) - 1
        first_token = 0 if self.keeps_prefix else self.prefix_tokens
        item = torch.div(order, self.tokens_per_item, rounding_mode="floor").masked_fill(~placeholders, -1)
        token = (order % self.tokens_per_item + first_token).masked_fill(~placeholders, -1)
        return item, token


Capture = Callable[[str, Tensor], None]


class EncoderAdapter(BaseAdapter):
    """A vision transformer: `prefix_tokens()` protected tokens, then a row-major patch grid."""

    @abstractmethod
    def entry_module(self) -> nn.Module:
        """A module that runs first in every forward (the patch embedding): state is reset there."""

    @abstractmethod
    def blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks, in order."""

    @abstractmethod
    def prefix_tokens(self) -> int:
        """How many leading tokens are never reduced (class, distillation, register tokens)."""

    @abstractmethod
    def has_class_token(self) -> bool:
        """Whether the first prefix token is a class token (the query of `attention("class")`)."""

    @abstractmethod
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the patch grid following the prefix tokens."""

    @abstractmethod
    def attend(self, block: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        """`x` plus the block's attention branch; `bias` [B, 1, 1, N] is added to every attention logit."""

    @abstractmethod
    def feed_forward(self, block: nn.Module, x: Tensor) -> Tensor:
        """`x` plus the block's MLP branch."""

    @abstractmethod
    def watch(self, block: nn.Module, capture: Capture) -> list[RemovableHandle]:
        """Hooks that pass the block's attention `"queries"` and `"keys"` [B, H, N, d] to `capture`."""

    @abstractmethod
    def attention_scale(self, block: nn.Module) -> float:
        """The factor applied to query-key products before the softmax."""

    @abstractmethod
    def size_weighted_pooling(self, sizes: Callable[[], Tensor | None]) -> Callable[[], None]:
        """Make the model's pooling weigh each token by `sizes()` [B, N] (None: as is); returns the undo."""

    def recomputes_blocks(self) -> bool:
        """Whether the blocks run again in the backward pass (gradient checkpointing), which would reduce
        twice; the driver then refuses forwards with gradients. This default: never."""
        return False


def replace_attribute(owner: object, name: str, value: object) -> Callable[[], None]:
    """Set the instance attribute `owner.name` to `value`; returns the undo, which puts back exactly what
    was there (an instance attribute of the same name set by someone else, or none)."""
    missing = object()
    previous = vars(owner).get(name, missing)
    setattr(owner, name, value)

    def undo() -> None:
        if previous is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, previous)

    return undo
