"""One registry mechanism for everything a plugin can add: transforms, backbones, losses, data readers, task
kinds, weight sources and face detectors.

Built-ins and plugins register the same way, with a decorator where they are defined
(`@LOSSES.register("focal")`). A registry knows the modules that hold its built-ins and imports them on its first
look-up, so importing the registry stays cheap and every name is looked up through the one `get`. A name registered twice, or one that shadows an albumentations transform or a timm model, is an
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

    def __init__(self, kind: str, external: Callable[[str], str | None] | None = None, builtins: tuple = ()):
        self.kind = kind
        self._external = external
        self._builtins = tuple(builtins)  # modules whose import registers the built-in entries
        self._entries: dict[str, Entry] = {}

    def _load_builtins(self) -> None:
        modules, self._builtins = self._builtins, ()
        for module in modules:
            importlib.import_module(module)

    def register(self, name: str | None = None, **meta):
        """Decorator: `@REGISTRY.register("name", key=value)` (name defaults to the object's __name__)."""
        def add(obj):
            builtin = getattr(obj, "__module__", "").startswith("framework.")
            self.add(name or obj.__name__, obj, "built-in" if builtin else origin_of(obj), **meta)
            return obj
        return add

    def add(self, name: str, target: Any, origin: str, **meta) -> Entry:
        self._load_builtins()  # a plugin's name is checked against the built-ins too
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

    def get(self, name: str) -> Entry:
        self._load_builtins()
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(f"unknown {self.kind} {name!r}.{did_you_mean(name, self._entries)}") from None

    def checked(self, name: str) -> str:
        """`name` if it is registered; else a ValueError listing the names (for schema validators)."""
        try:
            self.get(name)
        except RegistryError as e:
            raise ValueError(f"{e} Registered: {', '.join(self.names())}") from None
        return name

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        return name in self._entries

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def unregister(self, name: str) -> None:
        """Remove a name (tests and interactive sessions that reload a plugin)."""
        self._entries.pop(name, None)


def check_args(entry: Entry, args: dict, what: str, shorthands: set | frozenset = frozenset()):
    """The one check of what a recipe gives a registered entry (a loss's, a detector's, a task kind's options):
    the pydantic model it registered as `args=`, validated; returns the model's instance. An entry registered
    without one: None, and a built-in then takes nothing. Errors are ValueErrors (schema validators turn them into
    located errors); `shorthands` are keys the recipe wrote outside `args` (a loss's flat `gamma`)."""
    from pydantic import ValidationError

    schema = entry.meta.get("args")
    if schema is None:
        if args and entry.origin == "built-in":
            raise ValueError(f"{what} takes no args (got {', '.join(map(str, args))})")
        return None
    try:
        return schema.model_validate(args)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        key = ".".join(str(x) for x in first["loc"])
        shown = key if first["loc"] and first["loc"][0] in shorthands else f"args.{key}"
        if first["type"] == "extra_forbidden":
            takes = ", ".join(schema.model_fields) or "nothing"
            raise ValueError(f"{what} takes no {shown!r} (it takes: {takes})") from None
        if first["type"] == "missing":
            field_ = schema.model_fields.get(str(first["loc"][0]))
            about = f": {field_.description}" if field_ is not None and field_.description else ""
            raise ValueError(f"{what} needs {shown!r}{about}") from None
        raise ValueError(f"{shown}: {first['msg']} ({what})") from None


def _albumentations_has(name: str) -> str | None:
    from framework.libs import albumentations

    return f"albumentations.{name}" if hasattr(albumentations(), name) else None


def _timm_has(name: str) -> str | None:
    import timm

    return f"timm model {name!r}" if timm.is_model(name) else None


TRANSFORMS = Registry("transform", external=_albumentations_has)
BACKBONES = Registry("backbone", external=_timm_has)
LOSSES = Registry("loss", builtins=("framework.losses",))
READERS = Registry("reader", builtins=("framework.data.readers",))
TASK_KINDS = Registry("task kind", builtins=("framework.tasks.kinds",))
WEIGHTS = Registry("weight source", builtins=("framework.weights",))
DETECTORS = Registry("face detector", builtins=("framework.data.faces",))

REGISTRIES = {"transforms": TRANSFORMS, "backbones": BACKBONES, "losses": LOSSES, "readers": READERS,
              "task kinds": TASK_KINDS, "weight sources": WEIGHTS, "face detectors": DETECTORS}
