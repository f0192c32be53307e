"""The built-in toy VQA task and the trained toy LLaVA shipped with the package."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from tokenprune.builtin.models import (
    TOY_LLAVA_DIR,
    BuiltinModel,
    answer_questions,
    builtin_dataset,
    encode,
    load_toy_llava,
    toy_llava_processor,
    vqa_accuracy,
)
from tokenprune.builtin.toyvqa import (
    COLOURS,
    COUNTS,
    GRID,
    IMAGE_SIZE,
    SHAPES,
    generate_samples,
    normalize_answer,
)
from tokenprune.errors import ConfigError

HELDOUT_SLICE = 64
ACCURACY_FLOOR = 0.9


@pytest.fixture(scope="module")
def toy() -> BuiltinModel:
    return load_toy_llava()


def test_generator_is_deterministic_and_seeded():
    first, again = generate_samples("test", 16, seed=3), generate_samples("test", 16, seed=3)
    assert [(s.id, s.question, s.answers, s.image.tobytes()) for s in first] == [
        (s.id, s.question, s.answers, s.image.tobytes()) for s in again
    ]
    assert [s.question for s in generate_samples("test", 8, seed=3)] == [s.question for s in first[:8]]
    other = generate_samples("test", 16, seed=4)
    assert [s.image.tobytes() for s in first] != [s.image.tobytes() for s in other]


def test_splits_share_no_image():
    train = {s.image.tobytes() for s in generate_samples("train", 400)}
    test = {s.image.tobytes() for s in generate_samples("test", 400)}
    assert not train & test


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="'train' or 'test'"):
        generate_samples("val", 1)  # type: ignore[arg-type]


def test_samples_are_rgb_images_with_one_word_answers():
    samples = builtin_dataset("builtin:toy-vqa", "train", 30)
    assert {s.image.size for s in samples} == {(IMAGE_SIZE, IMAGE_SIZE)}
    assert {s.image.mode for s in samples} == {"RGB"}
    assert {s.answers[0] for s in samples} <= {*COLOURS, *SHAPES, *COUNTS}


def test_normalize_answer_drops_case_punctuation_and_articles():
    assert normalize_answer("  The Red.") == "red"
    assert normalize_answer("a circle!") == "circle"


def test_unknown_builtin_names_list_the_known_ones():
    from tokenprune.lab.loading import load_model

    with pytest.raises(ConfigError, match="known: builtin:toy-llava, builtin:tiny-llava"):
        load_model("builtin:nope")
    with pytest.raises(ConfigError, match="builtin:toy-vqa"):
        builtin_dataset("builtin:nope", "test", 1)


def test_the_builtin_name_loads_the_shipped_model(toy):
    from tokenprune.lab.loading import load_model

    loaded = load_model("builtin:toy-llava")
    assert (
        (loaded.prompt, loaded.max_new_tokens)
        == (toy.prompt, toy.max_new_tokens)
        == ("<image> {question}", 2)
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.model.state_dict().values(), toy.model.state_dict().values(), strict=True)
    )
    assert loaded.adapter.name == "llava"


def test_model_loads_through_from_pretrained_as_llava_1_5(toy):
    config = toy.model.config
    assert isinstance(toy.model, LlavaForConditionalGeneration)
    assert toy.model.dtype == torch.float32 and not toy.model.training
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert config.text_config._attn_implementation == "sdpa"
    assert (TOY_LLAVA_DIR / "model.safetensors").stat().st_size <= 12 * 2**20


def test_processor_expands_image_to_every_patch_token(toy):
    inputs = encode(toy, generate_samples("test", 2))
    image_tokens = inputs["input_ids"].eq(toy.model.config.image_token_id).sum(1)
    assert image_tokens.tolist() == [GRID * GRID] * 2
    assert inputs["attention_mask"][:, -1].all()  # left padding: every prompt ends at the last column


def test_the_training_scripts_processor_is_the_shipped_one(toy):
    built = toy_llava_processor()
    texts = [f"<image> {s.question} {s.answers[0]}</s>" for s in generate_samples("test", 8)]
    images = [s.image for s in generate_samples("test", 8)]
    ours = built(images=images, text=texts, padding=True, return_tensors="pt")
    shipped = toy.processor(images=images, text=texts, padding=True, return_tensors="pt")
    assert ours.keys() == shipped.keys()
    assert all(torch.equal(ours[k], shipped[k]) for k in ours)
    assert built.tokenizer.get_vocab() == toy.processor.tokenizer.get_vocab()


def test_processor_neither_resizes_nor_crops_the_generated_images(toy):
    samples = generate_samples("test", 2)
    pixels = encode(toy, samples)["pixel_values"]
    image_processor = toy.processor.image_processor
    mean = torch.tensor(image_processor.image_mean)[:, None, None]
    std = torch.tensor(image_processor.image_std)[:, None, None]
    images = torch.stack([torch.tensor(np.asarray(s.image)).permute(2, 0, 1) / 255 for s in samples])
    assert pixels.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(pixels, (images - mean) / std, atol=1e-5, rtol=0)


def test_heldout_accuracy_is_well_above_the_blind_rate(toy):
    samples = generate_samples("test", HELDOUT_SLICE, seed=0)
    accuracy = vqa_accuracy(answer_questions(toy, samples, batch_size=32), samples)
    recorded = json.loads((TOY_LLAVA_DIR / "tokenprune.json").read_text())["heldout"]
    assert accuracy >= ACCURACY_FLOOR > 2 * recorded["blind_rate"]


def test_save_and_reload_give_identical_logits(toy, tmp_path):
    toy.model.save_pretrained(tmp_path)
    toy.processor.save_pretrained(tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    reloaded = BuiltinModel(model, AutoProcessor.from_pretrained(tmp_path), toy.prompt, toy.max_new_tokens)
    samples = generate_samples("test", 3, seed=1)
    inputs, inputs_again = encode(toy, samples), encode(reloaded, samples)
    assert all(torch.equal(inputs[k], inputs_again[k]) for k in inputs)
    with torch.no_grad():
        assert torch.equal(toy.model(**inputs).logits, model(**inputs).logits)
