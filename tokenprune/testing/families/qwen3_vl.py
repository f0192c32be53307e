"""Qwen3-VL: tiny seeded models (dense and MoE), timestamped video prompts, and the conformance family.

The toys have Qwen3-VL's shapes scaled down: a vision tower with learned position embeddings and a
2 x 2 patch merger whose intermediate layers feed DeepStack (one feature per vision layer, added after
decoder layers 0, 1 and 2 of a 4-layer decoder: sites at K = 0..2 reduce before or inside the
injections, K = 3 after them), interleaved M-RoPE, per-head q/k norms (drawn away from 1:
`sharpen_attention`), an untied output layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from tokenprune.testing.family import Family, Sample
from tokenprune.testing.models import (
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
    ToySize,
    merger_vision_config,
    qwen_text_config,
    qwen_token_ids,
    seeded_model,
)
from tokenprune.testing.oracles import TEXT_IDS
from tokenprune.testing.qwen_inputs import Item, QwenPrompt, qwen_inputs

DEEPSTACK_LAYERS = 3  # vision layers feeding DeepStack: injected after decoder layers 0..2
TIMESTAMP_TOKENS = 2  # text tokens of one `<t seconds>` timestamp
TOY = ToySize()


def text_config(size: ToySize, attn_implementation: str) -> dict:
    """Qwen2-VL's toy text config with Qwen3-VL's explicit head size and interleaved M-RoPE sections."""
    config = qwen_text_config(size, attn_implementation)
    head_dim = size.hidden // size.heads
    config["head_dim"] = head_dim
    config["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8],  # (t, h, w) interleaved as h, w
        "mrope_interleaved": True,
    }
    return config


def vision_config(size: ToySize) -> dict:
    """A Qwen3-VL vision tower of `DEEPSTACK_LAYERS` layers, each feeding one DeepStack feature."""
    return {
        **merger_vision_config(size, depth=DEEPSTACK_LAYERS),
        "num_position_embeddings": 16,
        "deepstack_visual_indexes": list(range(DEEPSTACK_LAYERS)),
    }


def toy_qwen3_vl(size: ToySize = TOY, attn_implementation: str = "sdpa", seed: int = 0) -> PreTrainedModel:
    """A Qwen3-VL-shaped model (`Qwen3VLForConditionalGeneration`), float32, eval mode."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        text_config=text_config(size, attn_implementation),
        vision_config=vision_config(size),
        attn_implementation=attn_implementation,
        tie_word_embeddings=False,
        **qwen_token_ids(),
    )
    return seeded(Qwen3VLForConditionalGeneration, config, seed)


def toy_qwen3_vl_moe(
    size: ToySize = TOY, attn_implementation: str = "sdpa", seed: int = 0
) -> PreTrainedModel:
    """A Qwen3-VL-MoE-shaped model: the same layout, a sparse mixture of 4 experts (2 per token) per layer."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": size.intermediate // 2}
    config = Qwen3VLMoeConfig(
        text_config={**text_config(size, attn_implementation), **moe, "tie_word_embeddings": False},
        vision_config=vision_config(size),
        attn_implementation=attn_implementation,
        tie_word_embeddings=False,
        **qwen_token_ids(),
    )
    return seeded(Qwen3VLMoeForConditionalGeneration, config, seed)


def seeded(model_class: type[PreTrainedModel], config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """`model_class(config)` with weights drawn from `seed`, in eval mode, never generating a placeholder."""
    model = seeded_model(model_class, config, seed, (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID))
    sharpen_attention(model, seed)
    return model


@torch.no_grad()
def sharpen_attention(model: PreTrainedModel, seed: int) -> None:
    """Draw the decoder's q/k norm weights from [2, 5): with unit norms, queries and keys normalised per
    head give nearly uniform attention, the next token then hangs on the current one alone, and greedy
    decoding of random weights falls into loops."""
    generator = torch.Generator().manual_seed(seed)
    for layer in model.model.language_model.layers:
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            norm.weight.copy_(2 + 3 * torch.rand(norm.weight.shape, generator=generator))


@dataclass(frozen=True)
class TimedPrompt(QwenPrompt):
    """A Qwen3-VL sample: each temporal patch of a video is `<t seconds> <vision_start> patch <vision_end>`,
    as Qwen3-VL's processor writes it (timestamps: `TIMESTAMP_TOKENS` text tokens naming the patch)."""

    def ids(self, seed: int) -> list[int]:
        plain, out, at = super().ids(seed), [], 0  # the text of Qwen2-VL's prompt, items rewritten
        for i, n in enumerate(self.text):
            out += plain[at : at + n]
            at += n
            if i < len(self.items):
                out += item_ids(self.items[i])
                at += self.items[i].tokens + 2
        return out


def item_ids(item: Item) -> list[int]:
    """An image's span, or a video's temporal patches each behind its timestamp text."""
    if not item.video:
        return [VISION_START_TOKEN_ID, *[IMAGE_TOKEN_ID] * item.tokens, VISION_END_TOKEN_ID]
    frames = item.grid[0]
    patch = [VISION_START_TOKEN_ID, *[VIDEO_TOKEN_ID] * (item.tokens // frames), VISION_END_TOKEN_ID]
    return [token for t in range(frames) for token in (*timestamp(t), *patch)]


def timestamp(t: int) -> list[int]:
    """The text ids of temporal patch `t`'s timestamp (`TIMESTAMP_TOKENS` of them)."""
    return [TEXT_IDS.start + t % len(TEXT_IDS), TEXT_IDS.stop - 1]


# The k-th item of a sample: a 4 x 6 image (6 tokens), then a 2-frame 4 x 4 video (8 tokens), in turn.
ITEMS = (Item((1, 4, 6)), Item((2, 4, 4), video=True))


def prompts(samples: Sequence[Sample]) -> list[TimedPrompt]:
    """Qwen3-VL prompts of the samples, items alternating between an image and a timestamped video."""
    return [TimedPrompt(s.text, [ITEMS[k % len(ITEMS)] for k in range(s.items)]) for s in samples]


def model(attn_implementation: str) -> nn.Module:
    return toy_qwen3_vl(attn_implementation=attn_implementation)


def inputs(model: nn.Module, samples: Sequence[Sample], seed: int) -> dict[str, Tensor]:
    return qwen_inputs(model, prompts(samples), seed)


FAMILY = Family(adapter="qwen3_vl", model=model, inputs=inputs, model_positions=True)
