"""Testing kit: tiny seeded models of each family, input builders, the exactness oracles and the
adapter conformance suite (`tokenprune.testing.suite.AdapterConformance`, needs the `testing` extra)."""

from tokenprune.testing.families import get_family, list_families, register_family
from tokenprune.testing.family import Family, Sample

__all__ = ["Family", "Sample", "get_family", "list_families", "register_family"]
