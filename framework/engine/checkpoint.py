"""Atomic checkpoint and file writes: a partial write never replaces a good file."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import torch


def atomic_write_bytes(path: Path, write) -> None:
    """Call `write(file)` on a temporary file next to `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            from framework.errors import Issue, RunError
            raise RunError(Issue(f"no space left on the device while writing {path}; the previous {path.name} "
                                 "is unchanged.", fix="free some space (or move output.root), then continue "
                                 "with `recipe run --resume RUN_DIR`.")) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save(path: Path, state: dict) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def load(path: Path) -> dict:
    """A training checkpoint (tensors, numbers, strings and RNG states only; no code is unpickled)."""
    return torch.load(str(path), map_location="cpu", weights_only=True)
