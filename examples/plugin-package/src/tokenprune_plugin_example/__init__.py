"""An example tokenprune plug-in package: one strategy (`norm`) and one adapter (`example_llava`).

Both are declared as entry points in this package's pyproject.toml; once the package is
installed, `tokenprune.list_strategies()` lists `norm` and `tokenprune.list_adapters()` lists
`example_llava`, and `tokenprune` imports them the first time their name is used.
"""

from tokenprune_plugin_example.adapter import ExampleLlavaAdapter
from tokenprune_plugin_example.norm import NormParams, NormRanked

__all__ = ["ExampleLlavaAdapter", "NormParams", "NormRanked"]
