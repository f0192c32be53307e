"""The adapter contract: everything tokenprune needs to know about one model family, and nothing else.

An adapter finds the visual tokens in a batch, names the decoder layers and their attention
modules, and says which configuration holds the attention backend. It knows no strategy; the
core (`tokenprune.session`) drives the layers with the shared mechanics of `tokenprune.sequence`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn
from transformers import PretrainedConfig

from tokenprune.layout import VisualLayout
from tokenprune.probe import ProjectionProbe

if TYPE_CHECKING:
    from tokenprune.config import ReductionConfig
    from tokenprune.reducer import Reducer
    from tokenprune.vision import VisionTower


class BaseAdapter(ABC):
    """Root of every adapter: registered under `name`, chosen for `model_types` automatically.

    `Adapter` describes a vision-language model (reductions inside its language model);
    `tokenprune.encoder.EncoderAdapter` a vision transformer (reductions inside its blocks).
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        """Whether this adapter handles `model` (by its config's `model_type`)."""
        return getattr(getattr(model, "config", None), "model_type", None) in cls.model_types

    @abstractmethod
    def session(self, config: ReductionConfig, reducer: Reducer) -> Any:
        """The core mechanics that drive this kind of model (refusing configs it cannot run)."""


class Adapter(BaseAdapter):
    """Base class of vision-language model adapters: the language model's layers and visual tokens."""

    def session(self, config: ReductionConfig, reducer: Reducer) -> Any:
        from tokenprune.session import Session

        return Session(self.model, self, config, reducer)

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
