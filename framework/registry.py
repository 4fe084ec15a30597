"""One registry mechanism for everything a plugin can add: transforms, backbones, losses and data readers.

Built-ins and plugins register the same way: a decorator (`@LOSSES.register("focal")`) or, for built-ins whose
modules import torch, a lazy entry (`module:attribute`) that is imported only when used - so `recipe validate`
stays fast. A name registered twice, or one that shadows an albumentations transform or a timm model, is an
error naming both origins; a missing name lists the nearest ones.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from framework.errors import did_you_mean


class RegistryError(Exception):
    """A registration conflict or a missing name; the message says which names and where they came from."""


@dataclass
class Entry:
    name: str
    origin: str  # "built-in", or "path/to/plugin.py:LINE", or "entry point dist (module)"
    target: Any = None  # the registered object, or a "module:attribute" string until first use
    meta: dict = field(default_factory=dict)

    def load(self) -> Any:
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            self.target = getattr(importlib.import_module(module), attr)
        return self.target


def origin_of(obj: Any) -> str:
    """Where an object was defined, as `file:line` (or its module when the file is unknown)."""
    try:
        return f"{inspect.getsourcefile(obj)}:{inspect.getsourcelines(obj)[1]}"
    except (TypeError, OSError):
        return getattr(obj, "__module__", "?")


class Registry:
    """Names -> objects of one kind. `external` says whether a name already belongs to a library (a clash)."""

    def __init__(self, kind: str, external: Callable[[str], str | None] | None = None):
        self.kind = kind
        self._external = external
        self._entries: dict[str, Entry] = {}

    def register(self, name: str | None = None, **meta):
        """Decorator: `@REGISTRY.register("name", key=value)` (name defaults to the object's __name__)."""
        def add(obj):
            self.add(name or obj.__name__, obj, origin_of(obj), **meta)
            return obj
        return add

    def add(self, name: str, target: Any, origin: str, **meta) -> Entry:
        old = self._entries.get(name)
        if old is not None and old.origin != origin:
            raise RegistryError(f"{self.kind} {name!r} is registered twice: by {old.origin} and by {origin}. "
                                "Rename one of them.")
        if old is None and self._external is not None:
            clash = self._external(name)
            if clash:
                raise RegistryError(f"{self.kind} {name!r} from {origin} has the same name as {clash}. "
                                    "Choose another name.")
        entry = Entry(name, origin, target, meta)
        self._entries[name] = entry
        return entry

    def add_lazy(self, name: str, target: str, **meta) -> None:
        """A built-in that is imported on first use (`module:attribute`)."""
        self._entries[name] = Entry(name, "built-in", target, meta)

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(f"unknown {self.kind} {name!r}.{did_you_mean(name, self._entries)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def unregister(self, name: str) -> None:
        """Remove a name (tests and interactive sessions that reload a plugin)."""
        self._entries.pop(name, None)


def _albumentations_has(name: str) -> str | None:
    from framework.transforms import albumentations

    return f"albumentations.{name}" if hasattr(albumentations(), name) else None


def _timm_has(name: str) -> str | None:
    import timm

    return f"timm model {name!r}" if timm.is_model(name) else None


TRANSFORMS = Registry("transform", external=_albumentations_has)
BACKBONES = Registry("backbone", external=_timm_has)
LOSSES = Registry("loss")
READERS = Registry("reader")

for _name in ("cross_entropy", "focal", "f1", "l1", "smooth_l1", "mse"):
    LOSSES.add_lazy(_name, f"framework.losses:{_name}")
for _name in ("folder", "csv", "mask_contest", "bundled"):
    READERS.add_lazy(_name, f"framework.data.readers:read_{_name}")

REGISTRIES = {"transforms": TRANSFORMS, "backbones": BACKBONES, "losses": LOSSES, "readers": READERS}
