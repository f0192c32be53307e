"""Errors raised by tokenprune: each names what is wrong and how to fix it."""

import difflib
from collections.abc import Collection

from pydantic import ValidationError


class TokenPruneError(Exception):
    """Base class of every tokenprune error."""


class UnknownNameError(TokenPruneError, KeyError):
    """A strategy or adapter name that no registry knows."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PluginError(TokenPruneError):
    """A plug-in that cannot be loaded, or two plug-ins claiming one name."""


class ConfigError(TokenPruneError, ValueError):
    """A configuration that is valid on its own but not for this model, or a file that cannot be read."""


class AttachError(TokenPruneError):
    """A model that cannot take this reduction (no adapter, already attached, layer out of range...)."""


class InputError(TokenPruneError, ValueError):
    """Inputs that do not match what the model's configuration says (placeholder counts, grids...)."""


class StrategyError(TokenPruneError):
    """A strategy that broke the Reducer contract: a score or selection of the wrong shape, off budget..."""


def describe_errors(exc: ValidationError, known_fields: Collection[str] = ()) -> str:
    """`field.path: message` per pydantic error, joined by "; ", without pydantic's "Value error, " prefix.

    An unknown field close to one of `known_fields` gets a suggestion: "(did you mean `radius`?)".
    """
    parts = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden" and error["loc"]:
            message += _suggestion(str(error["loc"][-1]), known_fields)
        parts.append(f"{'.'.join(map(str, error['loc']))}: {message}" if error["loc"] else message)
    return "; ".join(parts)


def _suggestion(name: str, known: Collection[str]) -> str:
    """A hint ` (did you mean `x`?)` naming the known name closest to `name`, or "" when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""
