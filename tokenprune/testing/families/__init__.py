"""The registry of conformance families: entry points of the group `tokenprune.families`, loaded lazily.

A package registers its family in its `pyproject.toml`:

    [project.entry-points."tokenprune.families"]
    my_model = "my_package.testing:FAMILY"

and `tests/test_conformance.py` (or a package's own subclass of `AdapterConformance`) runs the
whole conformance suite against it. Each built-in family is one module of this package.
"""

from __future__ import annotations

from tokenprune.errors import PluginError
from tokenprune.registry import Registry
from tokenprune.testing.family import Family


class FamilyRegistry(Registry[Family]):
    """Names of conformance families: the registry machinery, holding `Family` values instead of classes."""

    def _check(self, name: str, origin: str, cls: object) -> None:
        if not isinstance(cls, Family):
            raise PluginError(f"family {name!r} from {origin} is not a tokenprune.testing.Family: {cls!r}")

    def _remember(self, name: str, cls: Family) -> None:
        self._loaded[name] = cls


FAMILIES = FamilyRegistry("family", "tokenprune.families", Family)
register_family = FAMILIES.register


def list_families(pattern: str = "*") -> list[str]:
    """Names of the registered families (built-in and installed plug-ins), filtered by a wildcard."""
    return FAMILIES.names(pattern)


def get_family(name: str) -> Family:
    """The family registered as `name` (an unknown name is an error listing the known ones)."""
    return FAMILIES.get(name)
