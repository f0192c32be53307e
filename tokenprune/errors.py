"""Errors raised by tokenprune: each names what is wrong and how to fix it."""

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
    """A strategy that returned a selection breaking the Reducer contract."""


def describe_errors(exc: ValidationError) -> str:
    """`field.path: message` per pydantic error, joined by "; ", without pydantic's "Value error, " prefix."""
    parts = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{'.'.join(map(str, error['loc']))}: {message}" if error["loc"] else message)
    return "; ".join(parts)
