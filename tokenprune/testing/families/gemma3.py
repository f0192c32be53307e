"""Gemma 3: sliding-window and global layers, each image's 3 x 3 pooled tokens attending both ways.

The tiny model (seeded, no download) keeps the shapes that matter: SigLIP tower, average-pool
projector (6 x 6 patches pooled to 3 x 3 = 9 tokens per image), scaled embeddings, q/k norms, a
local and a global RoPE base, and 6 decoder layers, global ones first (where attention-ranked sites
read their scores: the probe does not slide windows) and sliding-window ones at layers 3 and 5, with
a 6-token window, shorter than every prompt, so the window matters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

from tokenprune.testing.family import Family, Sample
from tokenprune.testing.models import IMAGE_TOKEN_ID, PAD_TOKEN_ID
from tokenprune.testing.oracles import TEXT_IDS, left_padded
from tokenprune.testing.suite_inputs import item_seeds, seeded_pixels

BOI_TOKEN_ID, EOI_TOKEN_ID, EOS_TOKEN_ID = 5, 6, 1
WINDOW = 6
TOY_LAYERS = ("full_attention",) * 3 + ("sliding_attention", "full_attention", "sliding_attention")
SIDE = 3  # pooled tokens per image side
IMAGE_SIZE = 24


def config(
    attn_implementation: str = "sdpa", layer_types: Sequence[str] = TOY_LAYERS, hidden: int = 64
) -> Gemma3Config:
    """A small Gemma 3 config: decoder layers of the kinds `layer_types`, width `hidden`, window `WINDOW`."""
    return Gemma3Config(
        text_config={
            "vocab_size": 128,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": len(layer_types),
            "layer_types": list(layer_types),
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": WINDOW,
            "max_position_embeddings": 4096,
            "pad_token_id": PAD_TOKEN_ID,
            "eos_token_id": EOS_TOKEN_ID,
            "bos_token_id": 2,
            "tie_word_embeddings": False,
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": 4,
        },
        mm_tokens_per_image=SIDE * SIDE,
        image_token_index=IMAGE_TOKEN_ID,
        boi_token_index=BOI_TOKEN_ID,
        eoi_token_index=EOI_TOKEN_ID,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )


def toy_gemma3(
    attn_implementation: str = "sdpa",
    seed: int = 0,
    layer_types: Sequence[str] = TOY_LAYERS,
    hidden: int = 64,
) -> nn.Module:
    """The tiny seeded Gemma 3, float32, in eval mode, generating neither placeholders nor eos.

    Gemma 3 initialises its projector to zeros (images would vanish) and the untied output layer with
    small weights (greedy decoding would repeat one token): both are redrawn larger.
    """
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config(attn_implementation, layer_types, hidden)).eval()
    with torch.no_grad():
        nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.5)
        nn.init.normal_(model.lm_head.weight, std=0.5)
    model.generation_config.suppress_tokens = [IMAGE_TOKEN_ID, BOI_TOKEN_ID, EOI_TOKEN_ID, EOS_TOKEN_ID]
    return model


def sample_ids(sample: Sample, seed: int) -> list[int]:
    """Text chunks around images, each image `<start_of_image>`, its placeholders, `<end_of_image>`."""
    generator = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for k, n in enumerate(sample.text):
        ids += torch.randint(TEXT_IDS.start, TEXT_IDS.stop, (n,), generator=generator).tolist()
        if k < sample.items:
            ids += [BOI_TOKEN_ID, *[IMAGE_TOKEN_ID] * (SIDE * SIDE), EOI_TOKEN_ID]
    return ids


def inputs(model: nn.Module, samples: Sequence[Sample], seed: int) -> dict[str, Tensor]:
    """A left-padded batch as Gemma 3's processor makes it, with `token_type_ids` (1 at placeholders)."""
    ids, mask = left_padded([sample_ids(s, seed + i) for i, s in enumerate(samples)])
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": (ids == IMAGE_TOKEN_ID).long()}
    seeds = item_seeds(samples, seed)
    if seeds:
        batch["pixel_values"] = torch.stack([seeded_pixels((3, IMAGE_SIZE, IMAGE_SIZE), s) for s in seeds])
    return batch


def image_blocks(input_ids: Tensor) -> Tensor:
    """[B, N] the image of each placeholder (runs of placeholders, counted per sample), -1 elsewhere."""
    blocks = torch.full(input_ids.shape, -1, dtype=torch.long)
    for b, row in enumerate(input_ids.tolist()):
        block = -1
        for n, token in enumerate(row):
            if token == IMAGE_TOKEN_ID:
                block += n == 0 or row[n - 1] != IMAGE_TOKEN_ID
                blocks[b, n] = block
    return blocks


def pattern(valid: Tensor, blocks: Tensor, window: int | None) -> Tensor:
    """bool [B, N, N] by slot: causal or within one image block, inside the window, over real keys."""
    length = valid.shape[1]
    query, key = torch.arange(length)[:, None], torch.arange(length)[None, :]
    same_block = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    allowed = (key <= query)[None] | same_block
    if window is not None:
        allowed &= (key > query - window)[None]
    return allowed & valid[:, None, :]


def attention(model: nn.Module, inputs: dict[str, Tensor], layer: int) -> Tensor:
    """The unreduced model's own pattern in decoder layer `layer`, written out from Gemma 3's rules."""
    text = model.config.text_config
    window = text.sliding_window if text.layer_types[layer] == "sliding_attention" else None
    return pattern(inputs["attention_mask"].bool(), image_blocks(inputs["input_ids"]), window)


FAMILY = Family(adapter="gemma3", model=toy_gemma3, inputs=inputs, attention=attention)
