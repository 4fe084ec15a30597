"""Atomic file writes (a partial write never replaces a good file) and the JSON / CSV helpers built on them.

No torch here: every layer may use it.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import tempfile
from pathlib import Path


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
        if _disk_full(e, path):
            from framework.errors import Issue, RunError
            raise RunError(Issue(f"no space left on the device while writing {path}; the previous {path.name} "
                                 "is unchanged.", fix="free some space (or move output.root), then continue "
                                 "with `recipe run --resume RUN_DIR`.")) from None
        raise


def _disk_full(e: BaseException, path: Path) -> bool:
    """ENOSPC / EDQUOT, also when a library hid it: torch.save on a full disk raises a RuntimeError ('[enforce fail
    at inline_container.cc] unexpected pos ...'), so any failed write with (almost) no space left counts."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if not isinstance(e, Exception):
        return False  # KeyboardInterrupt, SystemExit
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    previous = path.stat().st_size if path.exists() else 0
    return st.f_bavail * st.f_frsize < max(64 << 20, 2 * previous)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv(path: Path, header: list[str], rows) -> None:
    """A CSV file written atomically: the header, then each row."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def bar_size() -> dict:
    """tqdm's size options for stderr's terminal: follow its size when it reports one; a fixed one when it reports
    0 x 0 (some pseudo-terminals, CI runners), where tqdm would otherwise hide every bar."""
    try:
        size = os.get_terminal_size(2)
    except OSError:
        size = os.terminal_size((0, 0))
    if size.columns > 0 and size.lines > 0:
        return {"dynamic_ncols": True}
    return {"ncols": 100, "nrows": 24}
