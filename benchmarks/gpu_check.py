"""One command for a CUDA machine: exactness on the GPU, half precision and FlashAttention-2, time to
first token at LLaVA-1.5-7B size, and a device_map split; a markdown table of it all (--out).

    python benchmarks/gpu_check.py --out gpu-check.md        # a CUDA machine: under 8 minutes on one H200
    python benchmarks/gpu_check.py --smoke --out check.md    # tiny sizes on the CPU: proves the script runs

Sections, each a set of rows of the table (check, result, verdict):

1. `exactness`: every built-in pruning strategy (FastV at K=2, R=0.5 and the rest alike) on the toy
   LLaVA in float32 on the device, against the mask oracle of `tokenprune.testing.oracles` run on
   the CPU with the same weights: kept positions' logits within 1e-4 (TF32 off), greedy generation
   with the KV cache equal to the oracle's greedy run without one, a left-padded batch keeping the
   tokens each sample keeps alone.
2. `half precision`: the trained `builtin:toy-llava` on `builtin:toy-vqa` questions, FastV, DivPrune
   and ToMe in bfloat16 under SDPA against float32 SDPA, and under `flash_attention_2` (when
   flash-attn is installed) against bfloat16 SDPA: kept sets and next-token logits; ToMe's
   proportional attention is refused under FlashAttention at attach time (checked).
3. `time to first token`: a LLaVA-1.5-7B-shaped model with random weights at the real size (32
   layers, hidden 4096, MLP 11008, 576 visual tokens) in bfloat16, at batch 1 and 8 (left-padded):
   unreduced, FastV through tokenprune, and the ideal handed its kept tokens (`common.ideal_hooks`),
   paired and order-alternating (`common.compare`), beside the FLOPs bound.
4. `device_map`: with two GPUs or more, that model split across them by layers (accelerate's
   `dispatch_model`): kept positions and logits against one device, and its time to first token.
5. `selection overhead`: benchmarks/selection.py on the device at that size (every layer, the
   largest batch, `--keep` 192 visual tokens, a tower of CLIP-L's width 1024): each installed
   strategy's time inside its `select` (CUDA synchronised) and its share of the prefill it ran in,
   beside a paired prefill ratio.
6. `vLLM serving`: benchmarks/vllm_serving.py (LLaVA-1.5-7B shapes) in a Python that has vLLM and the
   tokenprune-vllm plug-in (this one, or `--vllm-python`, e.g. `.venv-vllm/bin/python`): throughput and
   time to first token with and without a DivPrune reduction at each batch size; skipped without vLLM.

A failed check is a FAIL row, the run goes on and ends with exit status 1. Timings at --smoke size
mean nothing. See docs/benchmarks.md, "GPU check".
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput

import tokenprune as tp
from tokenprune.builtin.models import builtin_dataset, encode, load_toy_llava
from tokenprune.core.masks import takes_key_bias
from tokenprune.errors import TokenPruneError
from tokenprune.testing.models import toy_llava
from tokenprune.testing.oracles import (
    Prompt,
    assert_same_greedy,
    generation_positions,
    greedy,
    llava_inputs,
    oracle_greedy,
    oracle_logits,
)

sys.path.insert(0, str(Path(__file__).parent))
import selection
from common import (
    ROW_HEADER,
    SMOKE_SHAPE,
    apply_smoke,
    check_close,
    compare,
    elapsed,
    flops_bound,
    ideal_logits,
    ideal_run,
    kept_tokens,
    llava_arguments,
    llava_description,
    llava_model,
    llava_prompt,
    machine,
    prefill_logits,
    quiet_run,
    timing_arguments,
    tokenprune_run,
)

LLAVA_7B = {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 32, "intermediate": 11008}
EXACT_TOL = 1e-4  # float32 on the device against the oracle on the CPU (test_devices.py: across devices)
STEPS = 4
TARGET_VS_IDEAL = 1.02
AGREEMENT = 0.95  # half precision: the share of samples whose next token must match the reference's
HALF_CONFIGS = {
    "fastv": tp.ReductionConfig(strategy="fastv", layer=2, ratio=0.5),
    "divprune": tp.ReductionConfig(strategy="divprune", layer=0, ratio=0.75),
    "tome": tp.ReductionConfig(strategy="tome", layer=2, ratio=0.5),
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: what was checked, what came out, and whether it passed (None: measured)."""

    section: str
    check: str
    result: str
    ok: bool | None = None


def parse_args() -> argparse.Namespace:
    """Sizes (LLaVA-1.5-7B by default), ratios, batches, the device and the table's path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    timing_arguments(parser)
    llava_arguments(parser, **LLAVA_7B)
    parser.set_defaults(dtype="bfloat16")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75], help="FastV R values")
    parser.add_argument("--layer", type=int, default=2, help="FastV K")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch > 1: left-padded")
    parser.add_argument("--samples", type=int, default=32, help="toy VQA questions in half precision")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--keep", type=int, default=192, help="selection overhead: visual tokens kept")
    parser.add_argument(
        "--vision-hidden", type=int, default=1024, help="selection overhead: the tower's width (CLIP-L's)"
    )
    parser.add_argument("--vllm-python", help="vLLM serving: a Python with vLLM and tokenprune-vllm")
    tiny = {"batches": [1, 3], "samples": 4, "ratios": [0.5], "keep": 4, "vision_hidden": 64}
    return apply_smoke(parser.parse_args(), **SMOKE_SHAPE, **tiny)


# -- moving inputs -----------------------------------------------------------------------------


def on(value: Any, device: torch.device | str) -> Any:
    """`value` with every tensor in it (dicts, lists, model outputs) on `device`."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, ModelOutput):
        return type(value)(**{key: on(item, device) for key, item in value.items()})
    if isinstance(value, dict):
        return {key: on(item, device) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(on(item, device) for item in value)
    return value


def on_cpu(trace: list[tp.ReductionEvent]) -> list[tp.ReductionEvent]:
    """The trace with its kept positions on the CPU, where the oracle runs."""
    return [dataclasses.replace(event, kept=event.kept.cpu()) for event in trace]


def checked(section: str, check: str, run: Callable[[], str], measured: bool = False) -> Row:
    """A row from `run()`'s result text (a pass, or `measured`); an exception makes it a FAIL row."""
    try:
        return Row(section, check, run(), None if measured else True)
    except Exception as error:  # every failure becomes a row; the run goes on
        traceback.print_exc()
        return Row(section, check, f"{type(error).__name__}: {str(error)[:200]}", False)


# -- 1. exactness on the device ------------------------------------------------------------------


def exactness(device: str) -> list[Row]:
    """Every built-in pruning strategy on the device against the mask oracle on the CPU, float32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    reference = toy_llava(seed=1)
    model = copy.deepcopy(reference).to(device)
    prompts = [Prompt([3, 4], 1), Prompt([1, 2, 5], 2), Prompt([4, 1], 1)]
    inputs = llava_inputs(prompts)
    pruning = [name for name in tp.list_strategies() if not tp.strategy_class(name).merges]
    pruning = [name for name in pruning if "language" in tp.strategy_class(name).sites]
    rows = []
    for name in pruning:
        config = tp.ReductionConfig(strategy=name, layer=2, ratio=0.5)
        rows.append(
            checked(
                "exactness",
                f"{name}: oracle, greedy, batch",
                lambda c=config: oracles(reference, model, inputs, prompts, c),
            )
        )
    return rows


@torch.no_grad()
def oracles(
    reference: nn.Module, model: nn.Module, inputs: dict[str, Tensor], prompts: list[Prompt], config: Any
) -> str:
    """The three oracles for one config; raises on the first mismatch, else says what held."""
    device = next(model.parameters()).device
    positions = generation_positions(inputs["attention_mask"])
    with tp.attach(model, config) as handle:
        logits = model(**on(inputs, device), position_ids=positions.to(device), use_cache=False).logits
        trace = on_cpu(handle.trace)
        tokens, _ = greedy(model, on(inputs, device), STEPS)
        alone = []
        for b in range(len(prompts)):
            model(**on(single_sample(inputs, prompts, b), device), use_cache=False)
            alone.append(handle.trace[0].kept[0].cpu())
    expected = oracle_logits(reference, inputs, trace, config=config)  # each stage's position policy
    worst = max(
        float((logits[b, row[row >= 0]].cpu() - expected[b, row[row >= 0]]).abs().max())
        for b, row in enumerate(trace[-1].kept)
    )
    if worst > EXACT_TOL:
        raise AssertionError(f"kept logits differ from the oracle's by {worst:.2e} > {EXACT_TOL}")
    oracle_tokens, oracle_step_logits = oracle_greedy(reference, inputs, trace, STEPS, config=config)
    assert_same_greedy(tokens.cpu(), oracle_tokens, oracle_step_logits)
    pad = (1 - inputs["attention_mask"]).sum(1)
    for b, kept in enumerate(alone):
        row = trace[0].kept[b]
        if not torch.equal(row[row >= 0] - pad[b], kept[kept >= 0]):
            raise AssertionError(f"sample {b} keeps other tokens in the batch than alone")
    return f"max abs diff {worst:.1e} <= {EXACT_TOL:.0e}; {STEPS} greedy tokens equal; batch = alone"


def single_sample(inputs: dict[str, Tensor], prompts: list[Prompt], b: int) -> dict[str, Tensor]:
    """Sample `b` of the batch alone, with its own images (as `llava_inputs` builds it alone)."""
    first = sum(p.images for p in prompts[:b])
    single = llava_inputs([prompts[b]], seed=b)
    single["pixel_values"] = inputs["pixel_values"][first : first + prompts[b].images]
    return single


# -- 2. half precision and FlashAttention-2 --------------------------------------------------------


def half_precision(args: argparse.Namespace) -> list[Row]:
    """The trained toy in bfloat16: SDPA against float32 SDPA, FlashAttention-2 against bfloat16 SDPA."""
    builtin = load_toy_llava("sdpa")
    samples = builtin_dataset("builtin:toy-vqa", "test", args.samples)
    inputs = on(dict(encode(builtin, samples)), args.device)
    float32 = builtin.model.to(args.device)
    sdpa = copy.deepcopy(float32).to(torch.bfloat16)
    rows = compared("bf16 SDPA vs float32 SDPA", sdpa, float32, inputs)
    missing = flash_attention_missing(args.device)
    if missing:
        return [*rows, Row("half precision", "bf16 flash_attention_2 vs bf16 SDPA", f"skipped: {missing}")]
    flash = copy.deepcopy(sdpa)
    switched = checked(
        "half precision", "language model on flash_attention_2", lambda: flash_language_model(flash)
    )
    if not switched.ok:
        return [*rows, switched]
    return rows + compared("bf16 flash_attention_2 vs bf16 SDPA", flash, sdpa, inputs)


def flash_language_model(model: nn.Module) -> str:
    """Switch the language model (where tokenprune acts) to FlashAttention-2; the tower stays as it is."""
    model.set_attn_implementation({"text_config": "flash_attention_2"})
    backend = tp.adapter_for(model).text_config()._attn_implementation
    if backend != "flash_attention_2":
        raise RuntimeError(f"the language model runs {backend!r} after asking for flash_attention_2")
    return backend


def compared(what: str, model: nn.Module, reference: nn.Module, inputs: dict[str, Tensor]) -> list[Row]:
    """Rows of `model` against `reference`: unreduced, then each strategy of `HALF_CONFIGS`."""
    rows = [
        checked("half precision", f"unreduced: {what}", lambda: agreement(model, reference, inputs, None))
    ]
    for name, config in HALF_CONFIGS.items():
        check = f"{name}: {what}"
        if tp.strategy_class(name).merges and not takes_key_bias(tp.adapter_for(model).text_config()):
            rows.append(checked("half precision", check, lambda c=config: refused(model, c)))
        else:
            rows.append(
                checked("half precision", check, lambda c=config: agreement(model, reference, inputs, c))
            )
    return rows


@torch.no_grad()
def next_token(
    model: nn.Module, inputs: dict[str, Tensor], config: tp.ReductionConfig | None
) -> tuple[Tensor | None, Tensor]:
    """(kept positions of the last stage or None unreduced, float32 next-token logits) of one prefill."""
    if config is None:
        return None, model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].float()
    with tp.attach(model, config) as handle:
        logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        return handle.trace[-1].kept, logits


def agreement(
    model: nn.Module, reference: nn.Module, inputs: dict[str, Tensor], config: tp.ReductionConfig | None
) -> str:
    """Next tokens, logits and kept sets of `model` against `reference`; raises below `AGREEMENT`.

    Kept sets are measured, not required: greedy or ranked selections flip at near-ties, which
    half precision moves (DivPrune's greedy chain most of all); the answer must hold.
    """
    kept, logits = next_token(model, inputs, config)
    expected_kept, expected_logits = next_token(reference, inputs, config)
    batch = len(logits)
    same_token = int((logits.argmax(-1) == expected_logits.argmax(-1)).sum())
    text = (
        f"next token equal in {same_token}/{batch}, max abs logit diff "
        f"{float((logits - expected_logits).abs().max()):.2e}"
    )
    if kept is not None:
        text += f"; kept sets: mean overlap {overlap(kept, expected_kept):.3f}"
    if same_token < AGREEMENT * batch:
        raise AssertionError(text)
    return text


def overlap(kept: Tensor, expected: Tensor) -> float:
    """Mean Jaccard overlap of two runs' kept positions (rows [B, L], -1 filler)."""
    shares = []
    for row, other in zip(kept.tolist(), expected.tolist(), strict=True):
        a, b = set(row) - {-1}, set(other) - {-1}
        shares.append(len(a & b) / max(len(a | b), 1))
    return sum(shares) / len(shares)


def refused(model: nn.Module, config: tp.ReductionConfig) -> str:
    """The attach-time refusal of proportional attention under FlashAttention (raises if it attaches)."""
    try:
        tp.attach(model, config).detach()
    except TokenPruneError as error:
        return f"refused at attach, as documented: {str(error)[:100]}"
    raise AssertionError("a merge with proportional attention attached under flash_attention_2")


def flash_attention_missing(device: str) -> str | None:
    """Why flash_attention_2 cannot run here, or None when it can."""
    if not device.startswith("cuda"):
        return "no CUDA device"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "flash-attn is not installed (pip install flash-attn)"
    return None


# -- 3. time to first token at LLaVA-1.5-7B size ---------------------------------------------------


def big_model(args: argparse.Namespace) -> nn.Module:
    """`common.llava_model` built straight on the device (a 7B model is not made on the CPU first)."""
    with torch.device(args.device):
        return llava_model(args)


def prompt_on(model: nn.Module, args: argparse.Namespace, batch: int) -> dict[str, Any]:
    """`common.llava_prompt` with the (tiny) tower on the CPU for its features; inputs moved to the
    device of the model's embeddings."""
    tower = [model.model.vision_tower, model.model.multi_modal_projector]
    device = model.model.language_model.embed_tokens.weight.device
    for module in tower:
        module.to("cpu")
    try:
        return on(llava_prompt(model, args, batch), device)
    finally:
        for module in tower:
            module.to(device)


def time_to_first_token(model: nn.Module, args: argparse.Namespace, batch: int, where: str) -> list[Row]:
    """Paired ratios at one batch: the noise floor, then per ratio tokenprune against ideal and unreduced."""
    inputs = prompt_on(model, args, batch)
    section = f"time to first token ({where})"

    def unreduced() -> float:
        return elapsed(lambda: prefill_logits(model, inputs))

    tokens = inputs["input_ids"].shape[1]
    print(f"== batch {batch}{', left-padded' if batch > 1 else ''}, {where}: {tokens} tokens per sample")
    print(ROW_HEADER)
    floor = compare(f"unreduced / unreduced (noise floor) b={batch}", unreduced, unreduced, args)
    rows = [
        Row(
            section,
            f"batch {batch}: unreduced",
            f"{1e3 * floor.baseline_s:.1f} ms (noise floor {floor.ratio:.3f})",
        )
    ]
    for ratio in args.ratios:
        config = tp.ReductionConfig(strategy="fastv", layer=args.layer, ratio=ratio)
        check = f"batch {batch}: FastV K={args.layer} R={ratio}"
        rows.append(
            checked(section, check, lambda c=config: speed(model, inputs, c, args, unreduced), measured=True)
        )
    return rows


def speed(
    model: nn.Module,
    inputs: dict[str, Any],
    config: tp.ReductionConfig,
    args: argparse.Namespace,
    unreduced: Callable[[], float],
) -> str:
    """tokenprune against the ideal (whose logits are checked first) and against the unreduced model.

    Measured: the target against the ideal is a verdict in the text, not a failed check (a loaded
    machine, or --smoke sizes, miss it without anything being wrong).
    """
    kept, logits = kept_tokens(model, inputs, config)
    check_close("ideal vs tokenprune", ideal_logits(model, inputs, args.layer, kept), logits, model.dtype)
    tokenprune = tokenprune_run(model, inputs, config)
    ideal = ideal_run(model, inputs, args.layer, kept)
    versus_ideal = compare("tokenprune / ideal", ideal, tokenprune, args, target=TARGET_VS_IDEAL)
    versus_full = compare("tokenprune / unreduced", unreduced, tokenprune, args)
    bound = flops_bound(model.config.text_config, args.layer, inputs["input_ids"].shape[1], kept.shape[1])
    return (
        f"{1e3 * versus_full.variant_s:.1f} ms: speed-up {versus_full.speedup:.2f}x, "
        f"FLOPs bound {bound:.2f}x; "
        f"tokenprune / ideal {versus_ideal.ratio:.3f} (IQR {versus_ideal.iqr:.3f}, "
        f"target <= {TARGET_VS_IDEAL}: {'met' if versus_ideal.ratio <= TARGET_VS_IDEAL else 'MISSED'})"
    )


# -- 4. a device_map split -------------------------------------------------------------------------


def split_devices(args: argparse.Namespace) -> list[str | int] | None:
    """The devices to split over: every GPU when there are two or more (the CPU twice under --smoke)."""
    if args.smoke:
        return ["cpu", "cpu"]
    count = torch.cuda.device_count()
    return list(range(count)) if count >= 2 else None


def layer_split(model: nn.Module, devices: list[str | int]) -> dict[str, str | int]:
    """A device map cutting the decoder layers into equal runs, one per device (the tower on the first)."""
    language = "model.language_model"
    layers = model.config.text_config.num_hidden_layers
    first, last = devices[0], devices[-1]
    split: dict[str, str | int] = {
        "model.vision_tower": first,
        "model.multi_modal_projector": first,
        f"{language}.embed_tokens": first,
        f"{language}.rotary_emb": first,
    }
    split.update({f"{language}.layers.{i}": devices[i * len(devices) // layers] for i in range(layers)})
    return {**split, f"{language}.norm": last, "lm_head": last}


def device_map_split(model: nn.Module, args: argparse.Namespace) -> list[Row]:
    """The model split by layers: the same kept positions and logits as on one device, then its timing."""
    devices = split_devices(args)
    if devices is None:
        return [
            Row("device_map", "split across GPUs", f"skipped: {torch.cuda.device_count()} GPU(s), needs 2")
        ]
    from accelerate import dispatch_model

    config = tp.ReductionConfig(strategy="fastv", layer=args.layer, ratio=args.ratios[0])
    batch = max(args.batches)
    one_device = kept_tokens(model, prompt_on(model, args, batch), config)
    dispatch_model(model, device_map=layer_split(model, devices))
    check = f"FastV R={args.ratios[0]}, batch {batch}, over {devices}"
    rows = [checked("device_map", check, lambda: same_reduction(model, args, batch, config, one_device))]
    with last_device_current(devices):  # the clock waits for the last device, which waits for the others
        return rows + time_to_first_token(model, args, batch, f"split over {len(devices)} devices")


def same_reduction(
    model: nn.Module,
    args: argparse.Namespace,
    batch: int,
    config: tp.ReductionConfig,
    expected: tuple[Tensor, Tensor],
) -> str:
    """Kept positions equal and last-token logits close to the one-device run."""
    kept, logits = kept_tokens(model, prompt_on(model, args, batch), config)
    if not torch.equal(kept.cpu(), expected[0].cpu()):
        raise AssertionError("the split keeps other positions than one device")
    logits, expected_logits = logits.cpu(), expected[1].cpu()
    check_close("split vs one device", logits, expected_logits, model.dtype)
    return f"kept positions equal; logits max abs diff {float((logits - expected_logits).abs().max()):.2e}"


@contextmanager
def last_device_current(devices: list[str | int]) -> Iterator[None]:
    """Make the last GPU of `devices` the current one (nothing on the CPU)."""
    if isinstance(devices[-1], int):
        with torch.cuda.device(devices[-1]):
            yield
    else:
        yield


# -- 5. each strategy's selection overhead on the device -------------------------------------------


def selection_overhead(args: argparse.Namespace) -> list[Row]:
    """benchmarks/selection.py on the device: every strategy's time inside `select` beside its prefill
    (LLaVA-1.5-7B-shaped, all layers, the largest batch), paired against the unreduced prefill."""
    model = selection.selection_model(args, args.device)
    inputs = selection.with_pixels(prompt_on(model, args, max(args.batches)), args, model.device)

    def unreduced() -> float:
        return elapsed(lambda: prefill_logits(model, inputs))

    print(ROW_HEADER)
    compare("unreduced / unreduced (noise floor, selection)", unreduced, unreduced, args)
    section, batch = "selection overhead", max(args.batches)
    rows = []
    for name in tp.list_strategies():
        check = f"{name}: batch {batch}, keep {args.keep}"
        rows.append(
            checked(
                section,
                check,
                lambda n=name: selection.verdict(
                    n, selection.measure(model, inputs, n, args, unreduced)
                ).strip(),
                measured=True,
            )
        )
    return rows


# -- 6. vLLM serving with and without a reduction ---------------------------------------------------


def vllm_serving(args: argparse.Namespace) -> list[Row]:
    """benchmarks/vllm_serving.py's paired rows, one per batch size; a skipped row when no vLLM is found."""
    importable = importlib.util.find_spec("vllm") is not None
    section, python = "vLLM serving", args.vllm_python or (sys.executable if importable else None)
    if python is None:
        skipped = "skipped: vLLM is not installed here (--vllm-python .venv-vllm/bin/python)"
        return [Row(section, "throughput, time to first token", skipped, None)]
    script, size = str(Path(__file__).with_name("vllm_serving.py")), "toy" if args.smoke else "llava-7b"
    command = [python, script, "--size", size, "--dtype", args.dtype, "--repeats", str(args.repeats)]
    command += ["--batches", *map(str, args.batches)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    except subprocess.CalledProcessError as error:
        return [Row(section, "vllm_serving.py", f"exit {error.returncode}: {error.stderr[-200:]}", False)]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line[:3].strip("| ").isdigit()]
    cells = [[cell.strip() for cell in row] for row in rows]
    return [
        Row(section, f"batch {b}: tok/s, TTFT (s)", f"{u} -> {r} ({x}); {tu} -> {tr} ({tx})")
        for b, u, r, x, tu, tr, tx in cells
    ]


# -- the table -------------------------------------------------------------------------------------


def markdown(rows: list[Row], header: list[str]) -> str:
    """The report: the machine and model lines, then one table row per check."""
    verdicts = {True: "pass", False: "**FAIL**", None: "measured"}
    lines = [*header, "", "| section | check | result | verdict |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.section} | {r.check} | {r.result} | {verdicts[r.ok]} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Run the four sections, print and write the table; exit status 1 when a check failed."""
    args = parse_args()
    quiet_run(args)
    header = [
        "# GPU check" + (" (--smoke: tiny sizes, timings mean nothing)" if args.smoke else ""),
        "",
        f"{machine()}; device {args.device}"
        + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") else ""),
        "",
        f"{llava_description(args)}; FastV K={args.layer}; paired ratios: median of {args.repeats} repeats",
    ]
    print("\n".join(header))
    rows = exactness(args.device) + half_precision(args)
    model = big_model(args)
    for batch in args.batches:
        rows += time_to_first_token(model, args, batch, "one device")
    rows += device_map_split(model, args)
    del model
    rows += selection_overhead(args)
    rows += vllm_serving(args)
    report = markdown(rows, header)
    print(report)
    if args.out is not None:
        args.out.write_text(report)
    return 1 if any(row.ok is False for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
