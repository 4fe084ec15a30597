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
