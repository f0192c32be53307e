"""Train `builtin:toy-video-llava` on `builtin:toy-video-vqa`, into tokenprune/builtin/data/toy-video-llava/.

    python tools/train_toy_video.py [--steps N] [--align-steps N] [--column-weight W]
                                    [--threads N] [--out DIR]

The model is Video-LLaVA-shaped: CLIP-style image and video towers (only the video tower sees the
task's clips) read at their second-to-last layer, frames keeping their class token, a two-layer
projector and a Llama decoder with tied word embeddings. Training follows `tools/train_toy.py`:
feature alignment (video tower, projector and word embeddings learn to name each frame patch's
colour and shape), then the projector and decoder on multi-turn questions, the tower frozen.

Deterministic: a fixed seed for the weights and fixed streams of batches (`generate_samples` seeds
ALIGN_SEEDS + step, then step); with the same torch version and thread count (one by default) it
writes the same weights. See docs/toy-video-model.md.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from torch.nn.functional import cross_entropy
from train_toy import (
    BATCH,
    descend,
    fit,
    naming_loss,
    probe_accuracy,
    seeded,
    supervised_batch,
    text_config,
    trained_and_saved,
    vision_config,
)
from transformers import (
    PreTrainedTokenizerFast,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaProcessor,
)

from tokenprune.builtin.models import (
    TOY_VIDEO_LLAVA_DIR,
    BuiltinModel,
    toy_video_llava_processor,
)
from tokenprune.builtin.toyvideo import (
    FRAME_SIZE,
    FRAMES,
    GRID,
    PATCH_SIZE,
    QUESTION_KINDS,
    VideoSample,
    all_questions,
    generate_samples,
)

STEPS = 1000
ALIGN_STEPS = 200
ALIGN_LR = 5e-3
COLUMN_WEIGHT = 0.0  # alignment: weight of the object-column loss (0: the committed weights; see the docs)
ALIGN_SEEDS = 10**6  # the alignment stage's batches: seeds ALIGN_SEEDS + step
PROBE = 96  # test samples (seed 1) scored during training
HELDOUT = 512  # test samples (seed 0) scored after training
PROMPT = "<video> {question}"
TURN = " {question} {answer}</s>"  # "<video>" + TURN without the answer is PROMPT
TURNS = 4
FRAME_TOKENS = 1 + GRID * GRID  # the class token, then the patch grid


def build_model(processor: VideoLlavaProcessor) -> VideoLlavaForConditionalGeneration:
    """The untrained toy Video-LLaVA, seeded: 3-layer CLIP towers read after layer 1, a 4-layer Llama."""
    tokenizer = processor.tokenizer
    config = VideoLlavaConfig(
        vision_config=vision_config(3, FRAME_SIZE, PATCH_SIZE),
        text_config=text_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_seq_length=GRID * GRID,
        video_seq_length=FRAMES * FRAME_TOKENS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        attn_implementation="sdpa",
        tie_word_embeddings=True,
    )
    return seeded(VideoLlavaForConditionalGeneration, config, tokenizer)


def conversation(sample: VideoSample, rng: random.Random) -> list[tuple[str, str]]:
    """TURNS questions about one clip in random order: one of each kind, then one more colour question."""
    turns = [rng.choice(all_questions(sample.tracks, kind)) for kind in (*QUESTION_KINDS, "colour")]
    rng.shuffle(turns)
    return list(dict.fromkeys(turns))[:TURNS]


def training_batch(processor: VideoLlavaProcessor, samples: list[VideoSample]) -> dict[str, torch.Tensor]:
    """Each clip followed by up to TURNS questions about it, right-padded; the loss is on answers and </s>."""
    texts = []
    for sample in samples:
        turns = conversation(sample, random.Random(sample.id))
        texts.append("<video>" + "".join(TURN.format(question=q, answer=a) for q, a in turns))
    return supervised_batch(processor, texts, videos=[s.frames for s in samples])


def patch_targets(samples: list[VideoSample], tokenizer: PreTrainedTokenizerFast, vocab: int) -> torch.Tensor:
    """[batch * frames, patches, vocab] word targets: a visible object's patch names its colour and shape."""
    targets = torch.zeros(len(samples), FRAMES, GRID * GRID, vocab)
    targets[..., tokenizer.pad_token_id] = 1
    for i, sample in enumerate(samples):
        for track in sample.tracks:
            for frame in range(FRAMES):
                patches = track.patches(frame)
                targets[i, frame, patches] = 0
                targets[i, frame, patches, tokenizer.convert_tokens_to_ids(track.colour_at(frame))] = 0.5
                targets[i, frame, patches, tokenizer.convert_tokens_to_ids(track.shape)] = 0.5
    return targets.flatten(0, 1)


def align(
    model: VideoLlavaForConditionalGeneration,
    processor: VideoLlavaProcessor,
    steps: int,
    column_weight: float,
) -> None:
    """Stage 1: each projected frame patch, read by the word embeddings, names the object drawn there.

    With `column_weight` > 0 a throwaway linear head also reads the object's column from the same
    features, so they keep where the object is (the motion questions need it; the word targets alone
    are position-free and erase it).
    """
    embeddings = model.get_input_embeddings()
    column_head = torch.nn.Linear(embeddings.weight.shape[1], GRID)
    parts = [model.model.video_tower, model.model.multi_modal_projector, embeddings, column_head]
    columns = torch.arange(GRID * GRID) % GRID  # row-major patches
    optimizer = torch.optim.AdamW([p for part in parts for p in part.parameters()], lr=ALIGN_LR)
    model.train()
    for step in range(steps):
        samples = generate_samples("train", BATCH, seed=ALIGN_SEEDS + step)
        videos = processor.video_processor([s.frames for s in samples], return_tensors="pt")
        pixels = videos["pixel_values_videos"].flatten(0, 1)
        hidden = model.model.video_tower(pixels, output_hidden_states=True).hidden_states
        features = model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:])
        targets = patch_targets(samples, processor.tokenizer, embeddings.weight.shape[0])
        loss, on_object = naming_loss(features @ embeddings.weight.T, targets)
        if column_weight:
            patch_columns = columns.expand(on_object.shape)[on_object]
            loss = loss + column_weight * cross_entropy(column_head(features[on_object]), patch_columns)
        descend(optimizer, loss, step, steps)


def train(model: VideoLlavaForConditionalGeneration, processor: VideoLlavaProcessor, steps: int) -> None:
    """Stage 2: the projector and decoder on the fixed stream of training batches, the towers frozen."""
    model.model.video_tower.requires_grad_(False)  # frozen after alignment, as in LLaVA's second stage
    model.model.image_tower.requires_grad_(False)  # the task has no images
    probe = generate_samples("test", PROBE, seed=1)  # not the held-out slice scored at the end

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        return training_batch(processor, generate_samples("train", BATCH, seed=step))

    fit(model, steps, batch_at, lambda: probe_accuracy(BuiltinModel(model, processor, PROMPT, 2), probe), 250)


def main() -> None:
    """Build, train, score on the held-out split and save the model, processor and settings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--align-steps", type=int, default=ALIGN_STEPS)
    parser.add_argument(
        "--column-weight", type=float, default=COLUMN_WEIGHT, help="alignment loss on columns"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the weights depend on it)")
    parser.add_argument("--out", type=Path, default=TOY_VIDEO_LLAVA_DIR)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    processor = toy_video_llava_processor()
    model = build_model(processor)

    def stages() -> None:
        align(model, processor, args.align_steps, args.column_weight)
        train(model, processor, args.steps)

    heldout = generate_samples("test", HELDOUT, seed=0)
    training = {
        "align_steps": args.align_steps,
        "column_weight": args.column_weight,
        "steps": args.steps,
        "batch": BATCH,
        "threads": args.threads,
    }
    task = {"task": "builtin:toy-video-vqa", "prompt": PROMPT}
    trained_and_saved(processor, model, stages, heldout, task, args.out, training)


if __name__ == "__main__":
    main()
