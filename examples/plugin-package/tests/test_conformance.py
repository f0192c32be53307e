"""tokenprune's adapter conformance suite against this package's `example_llava` adapter.

Every check of `tokenprune.testing.suite.AdapterConformance` (the mask and merge oracles, ratio-0
identity, batch equal to alone, the cache equal to recomputation, decode positions, detach and
every installed strategy at every site) runs on the family below: `python -m pytest -q`.
"""

from tokenprune_plugin_example.family import FAMILY

from tokenprune.testing.suite import AdapterConformance


class TestExampleLlava(AdapterConformance):
    family = FAMILY
