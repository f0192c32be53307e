"""Prefill latency of FastV through tokenprune, against the unreduced model and a hand-written ideal.

    python benchmarks/prefill.py                       # defaults: LLaVA-shaped, 8 layers, 2 threads
    python benchmarks/prefill.py --repeats 9 --ratios 0.5 --layers 16 --sections prefill

A LLaVA-1.5-shaped model with random weights (576 visual tokens, a Llama decoder) runs, in one
process and interleaved (round-robin over the variants in every round, after warm-up rounds):

- `unreduced`: the model as it is;
- `direct loop, full`: the decoder layers driven by hand on every token (the noise floor, and
  the cost of the model's own wrapper code);
- `tokenprune R=..`: FastV at layer K through `tokenprune.attach`, attached and detached around
  each run (attaching is not timed);
- `ideal R=..`: the same layers driven by hand, layers 0..K-1 on the full sequence, layers K.. on
  the tokens tokenprune kept (indices taken from its trace): the cost of a perfect implementation
  that is handed the indices, i.e. without FastV's scoring. Its last-token logits are checked
  against tokenprune's before timing.

Then: tokenprune against the ideal in back-to-back pairs, the time of each of tokenprune's hook
steps, the KV cache after a reduced prefill (layers < K hold every token, layers >= K the kept
ones: checked), and greedy decode steps with and without reduction.

Only the language model is timed: the image features are computed once and passed as
`mm_encoder_outputs`, and the LM head sees the last token only (`logits_to_keep=1`), as in
generation. See docs/benchmarks.md for a run and how to read it.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.utils import logging as hf_logging

import tokenprune as tp
from tokenprune.flops import model_flops, tokens_per_layer, trace_flops
from tokenprune.testing.models import IMAGE_TOKEN_ID, ToySize, toy_llava

SECTIONS = ("prefill", "cache", "decode")


def parse_args() -> argparse.Namespace:
    """Command-line options: model sizes, prompt, ratios, repeats, threads."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds over all variants")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="FastV R values")
    parser.add_argument("--layer", type=int, default=2, help="FastV K")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--grid", type=int, default=24, help="visual tokens per image: grid**2")
    parser.add_argument("--text-before", type=int, default=24, help="text tokens before the image")
    parser.add_argument("--text-after", type=int, default=16, help="text tokens after the image")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--decode-threads", type=int, default=None, help="threads for decode (default: --threads)"
    )
    parser.add_argument("--decode-tokens", type=int, default=16, help="new tokens per generate call")
    parser.add_argument("--decode-repeats", type=int, default=3, help="generate calls per variant")
    parser.add_argument("--pairs", type=int, default=12, help="tokenprune/ideal pairs at R=0.5 (0: off)")
    parser.add_argument("--breakdown", type=int, default=3, help="runs timing tokenprune's hooks (0: off)")
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="what to measure (default: all)",
    )
    return parser.parse_args()


# -- model and inputs ---------------------------------------------------------------------------


@dataclass
class Inputs:
    """One prompt: ids with a run of image placeholders, its pixels, and the image features for it."""

    input_ids: Tensor
    pixel_values: Tensor
    image_outputs: Any  # what LlavaModel.get_image_features returns, passed as mm_encoder_outputs


def build(args: argparse.Namespace) -> tuple[nn.Module, Inputs]:
    """The LLaVA-shaped model (tiny vision tower: it is not timed) and one prompt for it."""
    patch = 2
    size = ToySize(
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        grid=args.grid,
        patch=patch,
        vocab=args.vocab,
        vision_hidden=32,
        vision_layers=1,
    )
    model = toy_llava(size, attn_implementation="sdpa")
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(10, args.vocab, (1, args.text_before + args.text_after), generator=gen)
    image = torch.full((1, args.grid**2), IMAGE_TOKEN_ID)
    input_ids = torch.cat([text[:, : args.text_before], image, text[:, args.text_before :]], dim=1)
    pixel_values = torch.randn(1, 3, args.grid * patch, args.grid * patch, generator=gen)
    with torch.inference_mode():
        features = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
    return model, Inputs(input_ids, pixel_values, features)


# -- the variants ---------------------------------------------------------------------------------


@dataclass
class Variant:
    """A way to run the prefill: `run` is timed, `setup` and `teardown` around it are not."""

    name: str
    run: Callable[[], Tensor]
    setup: Callable[[], None] = lambda: None
    teardown: Callable[[], None] = lambda: None
    tokens: list[int] = field(default_factory=list)  # per decoder layer, for the FLOPs count
    ratio: float | None = None
    times: list[float] = field(default_factory=list)


def model_prefill(model: nn.Module, inputs: Inputs) -> Tensor:
    """The model's own forward on the prompt; last-token logits."""
    out = model(
        input_ids=inputs.input_ids,
        mm_encoder_outputs={"image": inputs.image_outputs},
        use_cache=False,
        logits_to_keep=1,
    )
    return out.logits


def ideal_prefill(model: nn.Module, inputs: Inputs, kept: Tensor | None, k: int) -> Tensor:
    """Decoder layers by hand: 0..k-1 on every token, k.. on `kept` (original positions, sorted).

    No mask is built: SDPA runs with `is_causal` on both lengths (a subsequence of a causal
    sequence, kept in order, is causal again). Kept tokens keep their rotary positions.
    """
    base, head = model.model, model.lm_head
    lm = base.language_model
    embeds = base.get_input_embeddings()(inputs.input_ids)
    features = torch.cat(inputs.image_outputs.pooler_output, dim=0).to(embeds.dtype)
    placeholders = (inputs.input_ids == IMAGE_TOKEN_ID)[..., None].expand_as(embeds)
    hidden = embeds.masked_scatter(placeholders, features)
    positions = torch.arange(hidden.shape[1])[None]
    cos, sin = lm.rotary_emb(hidden, position_ids=positions)
    for index, layer in enumerate(lm.layers):
        if index == k and kept is not None:
            hidden, cos, sin, positions = hidden[:, kept], cos[:, kept], sin[:, kept], positions[:, kept]
        hidden = layer(hidden, attention_mask=None, position_embeddings=(cos, sin), position_ids=positions)
    return head(lm.norm(hidden[:, -1:]))


def variants(model: nn.Module, inputs: Inputs, args: argparse.Namespace) -> list[Variant]:
    """Unreduced, direct loop, and per ratio tokenprune and ideal (its kept indices from a first run)."""
    n = inputs.input_ids.shape[1]
    full = [n] * args.layers
    out = [
        Variant("unreduced", lambda: model_prefill(model, inputs), tokens=full),
        Variant("direct loop, full", lambda: ideal_prefill(model, inputs, None, args.layer), tokens=full),
    ]
    for ratio in args.ratios:
        config = tp.ReductionConfig(strategy="fastv", layer=args.layer, ratio=ratio)
        with tp.attach(model, config) as handle, torch.inference_mode():
            reduced_logits = model_prefill(model, inputs)
            trace = handle.trace
        kept = trace[0].kept[0]
        with torch.inference_mode():
            ideal_logits = ideal_prefill(model, inputs, kept, args.layer)
        _check_close(f"ideal R={ratio} vs tokenprune", ideal_logits, reduced_logits)
        counts = tokens_per_layer(args.layers, trace, n)[0]
        out.append(_attached_variant(model, inputs, config, ratio, counts))
        out.append(
            Variant(
                f"ideal R={ratio}",
                lambda kept=kept: ideal_prefill(model, inputs, kept, args.layer),
                tokens=counts,
                ratio=ratio,
            )
        )
    with torch.inference_mode():
        direct, reference = ideal_prefill(model, inputs, None, args.layer), model_prefill(model, inputs)
    _check_close("direct loop vs model", direct, reference)
    return out


def _attached_variant(
    model: nn.Module, inputs: Inputs, config: tp.ReductionConfig, ratio: float, counts: list[int]
) -> Variant:
    handles: list[tp.Handle] = []
    return Variant(
        f"tokenprune R={ratio}",
        lambda: model_prefill(model, inputs),
        setup=lambda: handles.append(tp.attach(model, config)),
        teardown=lambda: handles.pop().detach(),
        tokens=counts,
        ratio=ratio,
    )


def _check_close(what: str, a: Tensor, b: Tensor) -> None:
    if not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"{what}: last-token logits differ by {(a - b).abs().max().item():.2e}")


# -- timing ---------------------------------------------------------------------------------------


def run_once(variant: Variant) -> float:
    """Seconds of one `variant.run()`, its setup and teardown outside the clock."""
    variant.setup()
    gc.collect()
    with torch.inference_mode():
        start = time.perf_counter()
        variant.run()
        elapsed = time.perf_counter() - start
    variant.teardown()
    return elapsed


def time_round_robin(all_variants: list[Variant], repeats: int, warmup: int) -> None:
    """Every round runs each variant once, starting one further along; rounds < warmup are not kept."""
    for round_ in range(warmup + repeats):
        shift = round_ % len(all_variants)
        for variant in all_variants[shift:] + all_variants[:shift]:
            elapsed = run_once(variant)
            if round_ >= warmup:
                variant.times.append(elapsed)


def report_pairs(first: Variant, second: Variant, pairs: int) -> None:
    """`first` against `second` in back-to-back pairs (order alternating): median and quartiles of the ratio.

    Two runs a second apart share the machine's state, so their ratio is far steadier than a
    comparison of separate medians when other work comes and goes.
    """
    ratios = []
    for index in range(pairs):
        if index % 2:
            b, a = run_once(second), run_once(first)
        else:
            a, b = run_once(first), run_once(second)
        ratios.append(a / b)
    low, mid, high = statistics.quantiles(ratios, n=4)
    print(
        f"\n{first.name} vs {second.name}, {pairs} back-to-back pairs: median {100 * (mid - 1):+.1f}% "
        f"(quartiles {100 * (low - 1):+.1f}% .. {100 * (high - 1):+.1f}%)"
    )


def report_prefill(all_variants: list[Variant], text_config: Any) -> None:
    """The table: times, speed-ups, the FLOPs-bound speed-up and tokenprune's overhead over the ideal.

    Ratios are given twice, from medians and from best times: on a shared machine the median
    resists bursts of other work and the best run is the least disturbed one; where they disagree
    the difference is noise. The `direct loop, full` row shows the noise floor (its work equals
    the unreduced run's).
    """
    median = {v.name: statistics.median(v.times) for v in all_variants}
    best = {v.name: min(v.times) for v in all_variants}
    base_flops = model_flops(text_config, all_variants[0].tokens)
    columns = ("median ms", "best ms", "speed-up", "FLOPs bound", "vs ideal")
    print(f"{'variant':<20}{columns[0]:>11}{columns[1]:>10}{columns[2]:>15}{columns[3]:>13}{columns[4]:>19}")
    print(f"{'':<20}{'':>11}{'':>10}{'med / best':>15}{'':>13}{'med / best':>19}")
    for v in all_variants:
        speed_up = f"{median['unreduced'] / median[v.name]:.2f} / {best['unreduced'] / best[v.name]:.2f}"
        bound = base_flops / model_flops(text_config, v.tokens)
        overhead = ""
        if v.name.startswith("tokenprune"):
            ideal = f"ideal R={v.ratio}"
            overhead = f"{_percent(median[v.name], median[ideal])} / {_percent(best[v.name], best[ideal])}"
        ms = f"{1e3 * median[v.name]:>11.1f}{1e3 * best[v.name]:>10.1f}"
        print(f"{v.name:<20}{ms}{speed_up:>15}{bound:>12.2f}x{overhead:>19}")


def _percent(value: float, reference: float) -> str:
    return f"{100 * (value / reference - 1):+.1f}%"


# -- where tokenprune's extra time goes ------------------------------------------------------------


@contextmanager
def timed_methods(targets: list[tuple[Any, str, str]], totals: dict[str, list[float]]):
    """Wrap `owner.attr` with a timer (label -> seconds per call) for the duration; restore afterwards."""
    saved = []
    for owner, attr, label in targets:
        original = getattr(owner, attr)
        saved.append((owner, attr, original))

        def wrapper(*a: Any, _original: Callable = original, _label: str = label, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return _original(*a, **kw)
            finally:
                totals.setdefault(_label, []).append(time.perf_counter() - start)

        setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


def report_breakdown(model: nn.Module, inputs: Inputs, args: argparse.Namespace, ideal: Variant) -> None:
    """Median ms per prefill of tokenprune's own steps (scoring, selection, gathers, masks, restore).

    The three top-level steps (entry, reduce, restore) are all the work tokenprune adds to a prefill
    besides a dictionary update per later layer; their sum is set against the ideal's best time.
    """
    ratio = ideal.ratio
    from tokenprune import session as session_module
    from tokenprune.contracts.probe import ProjectionProbe
    from tokenprune.contracts.reducer import ScoreReducer
    from tokenprune.core.language.session import Session

    totals: dict[str, list[float]] = {}
    per_run: dict[str, list[float]] = {}
    targets = [
        (Session, "_on_entry", "entry hook (layout)"),
        (Session, "_reduce", "reduce at site, all of it:"),
        (Session, "_view", "  token view (candidates, budget)"),
        (ScoreReducer, "select", "  select (score + top-k)"),
        (ProjectionProbe, "received", "    FastV scores (probe)"),
        (session_module, "_check_selection", "  check selection"),
        (session_module, "left_aligned_index", "  kept index"),
        (Session, "_overrides", "  mask + rotary gather"),
        (session_module, "gather_tokens", "  gathers (all in session)"),
        (Session, "_remember", "  cache record"),
        (Session, "_on_last_layer", "restore full length"),
    ]
    config = tp.ReductionConfig(strategy="fastv", layer=args.layer, ratio=ratio)
    # patch first: attach binds the hook methods it registers
    with timed_methods(targets, totals), tp.attach(model, config), torch.inference_mode():
        for _ in range(args.breakdown):
            totals.clear()
            model_prefill(model, inputs)
            for label, values in totals.items():
                per_run.setdefault(label, []).append(sum(values))
    print(f"\ntokenprune hook steps, R={ratio}, median ms per prefill over {args.breakdown} runs:")
    for _, _, label in targets:
        if label in per_run:
            print(f"  {label:<36} {1e3 * statistics.median(per_run[label]):8.2f}")
    top = [label for _, _, label in targets if not label.startswith(" ")]
    own = sum(statistics.median(per_run[label]) for label in top if label in per_run)
    score = statistics.median(per_run.get("    FastV scores (probe)", [0.0]))
    ideal_s = min(ideal.times)
    share = [f"{100 * x / ideal_s:.1f}%" for x in (own, score, own - score)]
    print(
        f"  = {1e3 * own:.1f} ms of tokenprune work per prefill, {share[0]} of the ideal's "
        f"{1e3 * ideal_s:.0f} ms ({share[1]} scoring, {share[2]} the rest)"
    )


# -- KV cache and decode ---------------------------------------------------------------------------


def cache_bytes(model: nn.Module, inputs: Inputs, expected: list[int]) -> int:
    """Bytes of keys and values after a prefill with a cache; fails unless each layer holds `expected`."""
    out = model(
        input_ids=inputs.input_ids,
        mm_encoder_outputs={"image": inputs.image_outputs},
        use_cache=True,
        logits_to_keep=1,
    )
    total = 0
    for index, layer in enumerate(out.cache.layers):
        held = (layer.keys.shape[-2], layer.values.shape[-2])
        if held != (expected[index], expected[index]):
            raise RuntimeError(f"layer {index} caches {held} key/value tokens, expected {expected[index]}")
        total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return total


def report_cache(model: nn.Module, inputs: Inputs, args: argparse.Namespace) -> None:
    """KV-cache bytes after one prefill, unreduced and for each ratio, layer counts checked."""
    n = inputs.input_ids.shape[1]
    print(f"\nKV cache after prefill ({n} prompt tokens), fp32:")
    with torch.inference_mode():
        full = cache_bytes(model, inputs, [n] * args.layers)
    print(f"  {'unreduced':<18} {full / 2**20:8.2f} MiB   every layer holds {n} tokens")
    for ratio in args.ratios:
        config = tp.ReductionConfig(strategy="fastv", layer=args.layer, ratio=ratio)
        with tp.attach(model, config) as handle, torch.inference_mode():
            model_prefill(model, inputs)  # the trace gives the kept count
            kept = handle.trace[0].tokens_after[0]
            expected = [n] * args.layer + [kept] * (args.layers - args.layer)
            size = cache_bytes(model, inputs, expected)
        print(
            f"  {'FastV R=' + str(ratio):<18} {size / 2**20:8.2f} MiB   {100 * size / full:5.1f}% "
            f"(layers < {args.layer}: {n} tokens, layers >= {args.layer}: {kept}; checked)"
        )


class StepClock(LogitsProcessor):
    """Records the time at each generation step (called once per forward, prefill included)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.stamps.append(time.perf_counter())
        return scores


def decode_step_times(model: nn.Module, inputs: Inputs, new_tokens: int) -> list[float]:
    """Seconds of each greedy decode step after the prefill (the prefill itself excluded)."""
    clock = StepClock()
    with torch.inference_mode():
        model.generate(
            input_ids=inputs.input_ids,
            pixel_values=inputs.pixel_values,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
        )
    return [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)]


def report_decode(model: nn.Module, inputs: Inputs, args: argparse.Namespace) -> None:
    """Median (and best) per-token decode time, unreduced vs FastV R=0.5, interleaved generate calls."""
    config = tp.ReductionConfig(strategy="fastv", layer=args.layer, ratio=0.5)
    steps: dict[str, list[float]] = {"unreduced": [], "FastV R=0.5": []}
    decode_step_times(model, inputs, 2)  # warm-up
    for _ in range(args.decode_repeats):
        steps["unreduced"] += decode_step_times(model, inputs, args.decode_tokens)
        with tp.attach(model, config):
            steps["FastV R=0.5"] += decode_step_times(model, inputs, args.decode_tokens)
    calls = (
        f"{args.decode_tokens} new tokens x {args.decode_repeats} calls, {torch.get_num_threads()} threads"
    )
    print(f"\nDecode, greedy, {calls}, median per token:")
    base = statistics.median(steps["unreduced"])
    for name, values in steps.items():
        ms = statistics.median(values)
        print(f"  {name:<18} {1e3 * ms:8.2f} ms/token (best {1e3 * min(values):.2f})   {base / ms:5.2f}x")


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    model, inputs = build(args)
    n = inputs.input_ids.shape[1]
    text_config = model.config.text_config
    print(
        f"LLaVA-shaped random model: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/"
        f"{args.kv_heads} kv, MLP {args.intermediate} (gated), vocab {args.vocab}; prompt {n} tokens "
        f"({args.grid**2} visual); FastV K={args.layer}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.repeats} timed rounds after {args.warmup} warm-up"
    )
    print(f"start: {_load()}")
    if "prefill" in args.sections:
        all_variants = variants(model, inputs, args)
        time_round_robin(all_variants, args.repeats, args.warmup)
        gflop = trace_flops(text_config, [], n)[0] / 1e9
        print(f"\nPrefill (language model only, last-token logits), {gflop:.1f} GFLOP unreduced:")
        report_prefill(all_variants, text_config)
        ratio = 0.5 if 0.5 in args.ratios else args.ratios[0]
        pair = [
            next(v for v in all_variants if v.name == f"{kind} R={ratio}") for kind in ("tokenprune", "ideal")
        ]
        if args.pairs:
            report_pairs(*pair, args.pairs)
        if args.breakdown:
            report_breakdown(model, inputs, args, pair[1])
    if "cache" in args.sections:
        report_cache(model, inputs, args)
    if "decode" in args.sections:
        torch.set_num_threads(args.decode_threads or args.threads)
        report_decode(model, inputs, args)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s; end: {_load()}")


def _load() -> str:
    """The 1-minute load average against the core count: other work on the machine skews timings."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
