"""The hook lifecycle of one attachment: every hook is recorded the moment it is placed, so that
`remove` takes all of them off again, after a complete install or a failed one alike."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn
from torch.utils.hooks import RemovableHandle


class Hooks:
    """The hooks one attachment placed on a model, removable at once."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def pre(self, module: nn.Module, hook: Callable) -> None:
        """A forward pre-hook receiving (module, args, kwargs)."""
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def post(self, module: nn.Module, hook: Callable, always_call: bool = False) -> None:
        """A forward hook receiving (module, args, output); `always_call` runs it after an exception too."""
        self._handles.append(module.register_forward_hook(hook, always_call=always_call))

    def add(self, handles: Iterable[RemovableHandle]) -> None:
        """Hooks placed by someone else (a probe, a vision site), removed with ours."""
        self._handles.extend(handles)

    def remove(self) -> None:
        """Take every recorded hook off the model, newest first."""
        while self._handles:
            self._handles.pop().remove()
