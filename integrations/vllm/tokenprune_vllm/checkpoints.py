"""Tiny seeded checkpoints saved in the layout vLLM loads: tests and the serving benchmark use them offline.

A word-level tokenizer (one token per vocabulary entry, no download) and the model's processor are saved
beside the weights; vLLM's CPU attention needs a head dimension of at least 32.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedModel, PreTrainedTokenizerFast

from tokenprune.testing.models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, ToySize, toy_llava

# head_dim = hidden / heads = 32, vLLM's CPU minimum
VLLM_TOY_SIZE = ToySize(hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=256, vision_hidden=64)
SPECIAL_TOKENS = {PAD_TOKEN_ID: "<pad>", 1: "<s>", 2: "</s>", IMAGE_TOKEN_ID: "<image>"}


def word_tokenizer(
    vocab_size: int, extra_special: dict[str, str] | None = None, names: dict[int, str] | None = None
) -> PreTrainedTokenizerFast:
    """A tokenizer whose token i is the word `w{i}` (specials and `names` named): any id sequence decodes and
    encodes; `extra_special` names more roles (a processor's `video_token`, say) than the image token."""
    named = {**SPECIAL_TOKENS, **(names or {})}
    vocab = {named.get(i, f"w{i}"): i for i in range(vocab_size)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<pad>",
        extra_special_tokens={"image_token": "<image>", **(extra_special or {})},
    )


def save_tiny_llava(folder: Path, size: ToySize = VLLM_TOY_SIZE, seed: int = 0) -> PreTrainedModel:
    """Save a seeded tiny LLaVA-1.5 with its processor to `folder` for vLLM; returns the HF model."""
    model = toy_llava(size, attn_implementation="sdpa", seed=seed)
    model.config.vision_config.projection_dim = size.vision_hidden
    model.save_pretrained(folder)
    _rename_vision_tower(folder)
    side = size.grid * size.patch
    images = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=word_tokenizer(size.vocab),
        patch_size=size.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(folder)
    return model


def _rename_vision_tower(folder: Path) -> None:
    """transformers saves the CLIP tower as `vision_tower.*`, vLLM loads `vision_tower.vision_model.*`."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    prefix = "vision_tower."
    renamed = {
        (f"{prefix}vision_model.{name[len(prefix) :]}" if name.startswith(prefix) else name): tensor
        for name, tensor in tensors.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})
