"""Every benchmark runs at its `--smoke` size, so none can rot unnoticed (issue 11, defect 14).

Each script runs in its own process, as a user runs it. A smoke run times nothing worth reading,
but it executes every section: the ideal's logits checked against tokenprune's (batch 1 and a
left-padded batch), the hook breakdown, the KV-cache lengths, the reference-loading path.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tokenprune.lab.timing import PairedRatio
from tokenprune.testing.models import toy_llava

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(path.name for path in BENCHMARKS.glob("*.py") if path.name != "common.py")
# a paired row: label, then ratio and IQR with three decimals, then two times in ms
PAIRED_ROW = re.compile(r"^\S.* / .*\s\d+\.\d{3}\s+\d+\.\d{3}\s+\d+\.\d\s+\d+\.\d", re.MULTILINE)
SMOKE_TIMEOUT_S = 240  # seconds on a loaded 2-core machine; a few each on a quiet one
# what each script's own checks print once they passed (new scripts: the paired rows only)
CHECKED = {
    "prefill.py": ["target <= 1.02", "tokenprune's hooks", "checked"],
    "decode.py": ["cache checked", "tokenprune's hooks:", "target <= 1.03"],
    "families.py": ["target <= 1.02", "FLOPs bound"],
    "vit_throughput.py": ["FLOPs ratio", "ToMe matching"],
    "gpu_check.py": ["| exactness | fastv", "| half precision |", "| device_map |", "target <= 1.02"],
    "selection.py": ["of its prefill; target <= 2%", "divprune", "dart", "uniform"],
}


def run_benchmark(script: str, *options: str) -> subprocess.CompletedProcess[str]:
    """`python benchmarks/<script> <options>` from the repository root, one thread, output captured."""
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--threads", "1", *options],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        cwd=BENCHMARKS.parent,
    )


def test_every_benchmark_is_listed():
    """The parametrised smoke test below sees the benchmarks there are (a new file joins by itself)."""
    assert {"prefill.py", "decode.py", "families.py", "vit_throughput.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_run_prints_paired_ratios(script):
    done = run_benchmark(script, "--smoke")
    assert done.returncode == 0, f"{script} --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "variant / baseline" in done.stdout
    rows = PAIRED_ROW.findall(done.stdout)
    assert any("noise floor" in row for row in rows), done.stdout
    assert len(rows) >= 2, done.stdout
    for marker in CHECKED.get(script, []):
        assert marker in done.stdout, f"{script} --smoke printed no {marker!r}:\n{done.stdout}"


def test_prefill_smoke_covers_every_section():
    done = run_benchmark("prefill.py", "--smoke", "--dtype", "bfloat16", "--ratios", "0.5")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "== batch 3, left-padded" in out
    assert out.count("target <= 1.02") == 2  # tokenprune / ideal, once per batch
    assert "tokenprune's hooks" in out and "Session" in out  # hook names come from the code itself
    assert "checked" in out  # the KV-cache lengths matched the trace


def test_gpu_check_smoke_writes_every_section_with_no_failure(tmp_path):
    table = tmp_path / "gpu-check.md"
    done = run_benchmark("gpu_check.py", "--smoke", "--out", str(table))
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    text = table.read_text()
    assert "**FAIL**" not in text
    one_device = "time to first token (one device)"
    sections = ("exactness", "half precision", one_device, "device_map", "selection overhead")
    for section in sections:
        assert f"| {section} |" in text, text
    assert "skipped: no CUDA device" in text  # FlashAttention-2 needs one: said, not silently left out
    assert text.count("| pass |") >= 8  # every pruning strategy's oracles, bf16 against float32
    assert "| selection overhead | divprune: batch 3, keep 4 | divprune " in text
    assert text.count("of its prefill") >= 3  # divprune, dart, uniform and every other strategy's share


def test_gpu_check_counts_the_flash_attention_refusal_of_proportional_attention():
    """The FlashAttention-2 rows of a GPU run: ToMe's attach-time refusal is the expected outcome."""
    sys.path.insert(0, str(BENCHMARKS))
    from gpu_check import HALF_CONFIGS, refused

    model = toy_llava()
    model.model.language_model.config._attn_implementation = "flash_attention_2"  # declared: attach only
    assert refused(model, HALF_CONFIGS["tome"]).startswith("refused at attach")
    with pytest.raises(AssertionError, match="attached under flash_attention_2"):
        refused(model, HALF_CONFIGS["fastv"])  # pruning adds no key bias: it attaches


def test_vit_reference_path_must_hold_the_reference(tmp_path):
    done = run_benchmark("vit_throughput.py", "--smoke", "--reference", str(tmp_path))
    assert done.returncode != 0
    assert "facebookresearch/ToMe" in done.stderr


def test_ratio_row_flags_noise_and_verdict():
    sys.path.insert(0, str(BENCHMARKS))
    from common import ratio_row

    steady = PairedRatio(ratio=1.01, iqr=0.02, baseline_s=0.5, variant_s=0.505, repeats=9)
    noisy = PairedRatio(ratio=1.05, iqr=0.2, baseline_s=0.5, variant_s=0.525, repeats=9)
    assert ratio_row("a / b", steady, target=1.02).endswith("target <= 1.02: met")
    row = ratio_row("a / b", noisy, target=1.02)
    assert "NOISY (spread 19% > 10%)" in row and "target <= 1.02: MISSED" in row
    assert PAIRED_ROW.search(ratio_row("a / b", steady))
