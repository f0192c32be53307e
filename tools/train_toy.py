"""Train `builtin:toy-llava` on `builtin:toy-vqa` and write it to tokenprune/data/toy-llava/.

    python tools/train_toy.py [--steps N] [--align-steps N] [--threads N] [--out DIR]

The model is LLaVA-1.5-shaped: a CLIP-style vision tower read at its second-to-last layer without
CLS, a two-layer projector and a Llama decoder with tied word embeddings. Training follows
LLaVA's two stages: feature alignment (vision tower, projector and word embeddings learn to name
each patch's colour and shape), then the projector and decoder on multi-turn questions with the
vision tower frozen, under a curriculum of one to four objects per scene.

Deterministic: a fixed seed for the weights and fixed streams of batches (`generate_samples`
seeds ALIGN_SEEDS + step, then step); with the same torch version and thread count (one by
default, which also wastes least on a shared machine) it writes the same weights. See
docs/toy-model.md.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

from tokenprune.builtin.models import (
    TOY_LLAVA_DIR,
    BuiltinModel,
    answer_questions,
    toy_llava_processor,
    vqa_accuracy,
)
from tokenprune.builtin.toyvqa import (
    COUNTS,
    GRID,
    IMAGE_SIZE,
    PATCH_SIZE,
    VQASample,
    count_question,
    generate_samples,
    object_questions,
)

SEED = 0
BATCH = 32
STEPS = 2400
ALIGN_STEPS = 400
ALIGN_LR = 5e-3
ALIGN_SEEDS = 10**6  # the alignment stage's batches: seeds ALIGN_SEEDS + step
LR = 2e-3
WARMUP = 50
PROBE = 96  # test samples (seed 1) scored during training
HELDOUT = 512  # test samples (seed 0) scored after training
PROMPT = "<image> {question}"
TURN = " {question} {answer}</s>"  # "<image>" + TURN without the answer is PROMPT
TURNS = 4

M = TypeVar("M", bound=PreTrainedModel)


def build_model(processor: LlavaProcessor) -> LlavaForConditionalGeneration:
    """The untrained toy LLaVA, seeded: a 4-layer CLIP tower read after its third layer, a 4-layer Llama.

    Vision layers 0 and 1 lie inside the tower, before the layer the projector reads, so pruning in
    the tower and pruning before the language model are different sites.
    """
    tokenizer = processor.tokenizer
    config = LlavaConfig(
        vision_config=vision_config(4, IMAGE_SIZE, PATCH_SIZE),
        text_config=text_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=GRID * GRID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        attn_implementation="sdpa",
    )
    return seeded(LlavaForConditionalGeneration, config, tokenizer)


def vision_config(layers: int, image_size: int, patch_size: int) -> CLIPVisionConfig:
    """The toys' CLIP-style tower: `layers` layers 64 wide with 2 heads, over `patch_size` pixel patches."""
    return CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=64,
    )


def text_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The toys' 4-layer Llama decoder with tied word embeddings."""
    return LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )


def seeded(model_class: type[M], config: PretrainedConfig, tokenizer: PreTrainedTokenizerFast) -> M:
    """`model_class(config)` with weights drawn from SEED, decoding greedily two tokens at most."""
    torch.manual_seed(SEED)
    model = model_class(config)
    model.generation_config.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=2,
        do_sample=False,
    )
    return model


def conversation(sample: VQASample, rng: random.Random) -> list[tuple[str, str]]:
    """Up to TURNS questions about one image in random order: the count and one per object.

    Never two about one object: "what colour is the square" would give away "which shape is red".
    """
    turns = [rng.choice(object_questions(obj)) for obj in sample.objects] + [count_question(sample.objects)]
    rng.shuffle(turns)
    return turns[:TURNS]


def training_batch(processor: LlavaProcessor, samples: list[VQASample]) -> dict[str, torch.Tensor]:
    """Each image followed by up to TURNS questions about it, right-padded; the loss is on answers and </s>.

    Several turns per image, as in LLaVA's multi-turn instruction data, multiply the supervised tokens
    for little more compute; the first turn is exactly the inference prompt.
    """
    texts = []
    for sample in samples:
        turns = conversation(sample, random.Random(sample.id))
        texts.append("<image>" + "".join(TURN.format(question=q, answer=a) for q, a in turns))
    return supervised_batch(processor, texts, images=[s.image for s in samples])


def supervised_batch(processor: ProcessorMixin, texts: list[str], **visual: list) -> dict[str, torch.Tensor]:
    """The processor's right-padded batch of `texts` and `visual` inputs, labelled on each </s> and the
    one-word answer before it (the rest -100)."""
    inputs = processor(text=texts, padding=True, padding_side="right", return_tensors="pt", **visual)
    ids = inputs["input_ids"]
    eos = ids == processor.tokenizer.eos_token_id
    supervised = eos | torch.cat([eos[:, 1:], eos[:, :1]], 1)
    return {**inputs, "labels": torch.where(supervised, ids, -100)}


def learning_rate(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of LR."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def patch_targets(samples: list[VQASample], tokenizer: PreTrainedTokenizerFast, vocab: int) -> torch.Tensor:
    """[batch, patches, vocab] word targets: an object's patch names its colour and shape, others <pad>."""
    targets = torch.zeros(len(samples), GRID * GRID, vocab)
    targets[..., tokenizer.pad_token_id] = 1
    for i, sample in enumerate(samples):
        for obj in sample.objects:
            patches = obj.patches()
            targets[i, patches] = 0
            targets[i, patches, tokenizer.convert_tokens_to_ids(obj.colour)] = 0.5
            targets[i, patches, tokenizer.convert_tokens_to_ids(obj.shape)] = 0.5
    return targets


def align(model: LlavaForConditionalGeneration, processor: LlavaProcessor, steps: int) -> None:
    """Stage 1, like LLaVA's feature alignment: projected patches, read by word embeddings, name their object.

    Trains the vision tower, the projector and the word embeddings only, at a fraction of a full step's cost.
    """
    embeddings = model.get_input_embeddings()
    parts = [model.model.vision_tower, model.model.multi_modal_projector, embeddings]
    optimizer = torch.optim.AdamW([p for part in parts for p in part.parameters()], lr=ALIGN_LR)
    model.train()
    for step in range(steps):
        samples = generate_samples("train", BATCH, seed=ALIGN_SEEDS + step)
        pixels = processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        features = model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:])
        targets = patch_targets(samples, processor.tokenizer, embeddings.weight.shape[0])
        loss, _ = naming_loss(features @ embeddings.weight.T, targets)
        descend(optimizer, loss, step, steps)


def naming_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, on_object [..., patches]): cross-entropy of the patches' word `logits` against `targets`,
    objects' patches (their target gives word 0, <pad>, nothing) weighing as much as the background's."""
    losses, on_object = -(targets * logits.log_softmax(-1)).sum(-1), targets[..., 0] == 0
    return losses[on_object].mean() + losses[~on_object].mean(), on_object


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor, step: int, steps: int) -> None:
    """One alignment step on `loss`, logged every 50 steps."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if (step + 1) % 50 == 0:
        print(f"align {step + 1}/{steps} loss {loss.item():.4f}", flush=True)


def curriculum(step: int, steps: int) -> int:
    """At most one object per scene for the first tenth of the steps, one more each tenth, up to four."""
    return min(len(COUNTS), 1 + 10 * step // steps)


def train(model: LlavaForConditionalGeneration, processor: LlavaProcessor, steps: int) -> None:
    """Stage 2: the projector and decoder on the curriculum's batches, the vision tower frozen."""
    model.model.vision_tower.requires_grad_(False)  # frozen after alignment, as in LLaVA's second stage
    probe = generate_samples("test", PROBE, seed=1)  # not the held-out slice scored at the end

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        samples = generate_samples("train", BATCH, seed=step, max_objects=curriculum(step, steps))
        return training_batch(processor, samples)

    fit(model, steps, batch_at, lambda: probe_accuracy(BuiltinModel(model, processor, PROMPT, 2), probe), 200)


def fit(
    model: PreTrainedModel,
    steps: int,
    batch_at: Callable[[int], dict[str, torch.Tensor]],
    probe: Callable[[], dict[str, float]],
    probe_every: int,
) -> None:
    """AdamW on the parameters left trainable over the fixed stream `batch_at(step)`, logging the running
    loss every 50 steps and the `probe` accuracies every `probe_every`."""
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=LR, weight_decay=0.01, betas=(0.9, 0.98))
    start, running = time.perf_counter(), 0.0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        loss = model(**batch_at(step)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        running += loss.item()
        if (step + 1) % 50 == 0:
            elapsed = time.perf_counter() - start
            print(f"step {step + 1}/{steps} loss {running / 50:.4f} {elapsed:.0f}s", flush=True)
            running = 0.0
        if (step + 1) % probe_every == 0:
            model.eval()
            print(f"  probe accuracy by kind {probe()}", flush=True)
            model.train()
    model.eval()


def probe_accuracy(model: BuiltinModel, samples: list) -> dict[str, float]:
    """Accuracy per question kind of `model`'s answers on `samples`."""
    return accuracy_by_kind(answer_questions(model, samples), samples)


def accuracy_by_kind(predictions: list[str], samples: list) -> dict[str, float]:
    """Accuracy per question kind (the question's first two words)."""
    kinds: dict[str, list[bool]] = {}
    for prediction, sample in zip(predictions, samples, strict=True):
        kind = " ".join(sample.question.split()[:2])
        kinds.setdefault(kind, []).append(vqa_accuracy([prediction], [sample]) == 1)
    return {kind: round(sum(hits) / len(hits), 2) for kind, hits in sorted(kinds.items())}


def baselines(samples: list) -> dict[str, float]:
    """Blind rates on `samples`: the most common answer, and the most common answer per question."""
    answers = Counter(s.answers[0] for s in samples)
    per_question: dict[str, Counter[str]] = {}
    for s in samples:
        per_question.setdefault(s.question, Counter())[s.answers[0]] += 1
    blind = sum(c.most_common(1)[0][1] for c in per_question.values())
    return {"majority_rate": answers.most_common(1)[0][1] / len(samples), "blind_rate": blind / len(samples)}


def trained_and_saved(
    processor: ProcessorMixin,
    model: PreTrainedModel,
    stages: Callable[[], None],
    heldout: list,
    task: dict[str, str],
    out: Path,
    training: dict[str, object],
) -> None:
    """Run the training `stages`, timed; score `heldout` (the test split's seed 0); save the model, the
    processor and tokenprune.json (`task`, held-out scores, `training` with the time and size)."""
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f} M parameters", flush=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    stages()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    answers = answer_questions(BuiltinModel(model, processor, task["prompt"], 2), heldout)
    accuracy = vqa_accuracy(answers, heldout)
    print(f"held-out accuracy {accuracy:.3f} after {seconds:.0f}s ({cpu_seconds:.0f} CPU s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    scores = {
        "accuracy": accuracy,
        "accuracy_by_kind": accuracy_by_kind(answers, heldout),
        **baselines(heldout),
    }
    settings = {
        **task,
        "max_new_tokens": 2,
        "heldout": {"split": "test", "seed": 0, "n": len(heldout), **scores},
        "training": {
            **training,
            "seconds": round(seconds),
            "cpu_seconds": round(cpu_seconds),
            "parameters": params,
        },
    }
    (out / "tokenprune.json").write_text(json.dumps(settings, indent=2) + "\n")


def main() -> None:
    """Build, train, score on the held-out split and save the model, processor and settings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--align-steps", type=int, default=ALIGN_STEPS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the weights depend on it)")
    parser.add_argument("--out", type=Path, default=TOY_LLAVA_DIR)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    processor = toy_llava_processor()
    model = build_model(processor)

    def stages() -> None:
        align(model, processor, args.align_steps)
        train(model, processor, args.steps)

    heldout = generate_samples("test", HELDOUT, seed=0)
    training = {"align_steps": args.align_steps, "steps": args.steps, "batch": BATCH, "threads": args.threads}
    task = {"task": "builtin:toy-vqa", "prompt": PROMPT}
    trained_and_saved(processor, model, stages, heldout, task, args.out, training)


if __name__ == "__main__":
    main()
