"""Qwen3-VL (`Qwen3VLForConditionalGeneration`) and its MoE variant (`Qwen3VLMoeForConditionalGeneration`).

The layout is Qwen2-VL's (`Qwen2VLAdapter`): image and video placeholders are the candidates, each image
a segment of its merged grid `(1, h / 2, w / 2)`, each video one segment of `t` temporal patches with
coordinates `(t, row, col)`. Qwen3-VL's processor writes each temporal patch of a video as
`<t seconds> <|vision_start|> h*w/4 x <|video_pad|> <|vision_end|>`: the timestamps are text (always
kept), and the placeholders of one video still form one segment whose frame `t` is its t-th patch, for
`budget: per_frame` and for `uniform` over time.

Positions: the model folds its interleaved M-RoPE (temporal, height, width frequencies in turn) into the
`(cos, sin)` tables every decoder layer gets, and numbers each frame of a video as a grid of its own;
under the `original` policy the core gathers those tables by original position, so kept tokens keep
their positions and nothing is recomputed (decode positions: the model's own, as for Qwen2-VL).

DeepStack: the model adds features of several vision-tower layers (`deepstack_visual_indexes`) to the
hidden states at the visual positions after each of its first decoder layers (`_deepstack_process`).
While a site has shortened the sequence, the adapter moves those features onto the kept tokens
(`tokenprune.core.language.injections`): every kept token receives exactly its own feature, as in the
unreduced model, and a merged token receives the feature of the survivor it was merged into.

Attention signals: the model normalises each head's queries and keys after their projections (`q_norm`,
`k_norm`); the default probe (`ProjectionProbe`) applies them as the layer does.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from tokenprune.contracts.adapter import replace_attribute
from tokenprune.core.language.injections import CurrentRows, follow_packed

from .qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Adapter for Qwen3-VL and Qwen3-VL-MoE: Qwen2-VL's layout, DeepStack features follow the kept tokens."""

    name = "qwen3_vl"
    model_types = ("qwen3_vl", "qwen3_vl_moe")
    no_vision_tower = (
        "Qwen3-VL's vision encoder has no class token (the query of class-attention rankings), merges each "
        "2 x 2 group of patches before the language model, and feeds DeepStack from its intermediate layers"
    )

    def follow_tokens(self, rows: CurrentRows) -> Callable[[], None]:
        """DeepStack features added after the first decoder layers go to the kept tokens' rows."""
        language = self.base_model().language_model
        inject = language._deepstack_process

        def deepstack(hidden: Tensor, visual_pos_masks: Tensor, visual_embeds: Tensor) -> Tensor:
            positions = rows.positions()
            if positions is not None:
                visual_pos_masks, visual_embeds = follow_packed(
                    visual_pos_masks, visual_embeds, positions.to(hidden.device)
                )
            return inject(hidden, visual_pos_masks, visual_embeds)

        return replace_attribute(language, "_deepstack_process", deepstack)
