"""Third-party libraries imported the way this project needs them (no torch pulled in when it is not needed, no
network access at import), for every layer to use."""
from __future__ import annotations

import os
import sys


def albumentations():
    """Import albumentations without pulling in torch (its optional `albumentations.pytorch` part) unless torch
    is already loaded, so `recipe validate` stays fast."""
    if "albumentations" in sys.modules:
        return sys.modules["albumentations"]
    blocked = "torch" not in sys.modules and "albumentations.pytorch" not in sys.modules
    if blocked:
        sys.modules["albumentations.pytorch"] = None  # type: ignore[assignment]
    asked = os.environ.get("NO_ALBUMENTATIONS_UPDATE")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # 2.0.8 asks its package index on import: not from here
    try:
        import albumentations as A
    finally:
        if blocked:
            del sys.modules["albumentations.pytorch"]
        if asked is None:  # the user's environment is left as it was
            del os.environ["NO_ALBUMENTATIONS_UPDATE"]
    return A


class _Lazy:
    """A module imported on first use: `torch = lazy("torch")` at the top of a module that needs torch only when
    its functions run, so importing the module (e.g. for `recipe validate`) does not import torch."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        import importlib

        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy(name: str) -> _Lazy:
    return _Lazy(name)
