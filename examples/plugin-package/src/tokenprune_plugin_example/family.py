"""The conformance family of the `example_llava` adapter: what `tokenprune.testing`'s suite needs of it.

Registered under the entry-point group `tokenprune.families` (see pyproject.toml), so tokenprune's
registry-driven conformance tests run it too; `tests/test_conformance.py` runs the suite here.
The tiny seeded LLaVA and its batches are those of tokenprune's own `llava` family: the same
models, attached through this package's adapter.
"""

from __future__ import annotations

from tokenprune.testing import Family
from tokenprune.testing.families.llava import inputs, model

FAMILY = Family(adapter="example_llava", model=model, inputs=inputs)
