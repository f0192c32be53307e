"""Fixtures of the vLLM plug-in's tests: one tiny LLaVA saved in the layout vLLM loads, and its HF twin."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # engine.py: the runner the tests start in subprocesses

from tokenprune_vllm.checkpoints import save_tiny_llava


@pytest.fixture(scope="session")
def llava(tmp_path_factory: pytest.TempPathFactory):
    """(folder of the saved checkpoint, the same model in transformers)."""
    folder = tmp_path_factory.mktemp("tiny-llava")
    model = save_tiny_llava(folder)
    return folder, model
