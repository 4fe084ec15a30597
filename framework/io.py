"""Atomic file writes (a partial write never replaces a good file) and the JSON / CSV helpers built on them.

No torch here: every layer may use it.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import stat
import tempfile
from pathlib import Path

MAX_TEXT_BYTES = 64 << 20  # a recipe, manifest or run-folder file larger than this is not one


class FileProblem(Exception):
    """A file that cannot be read as asked (missing, not a regular file, too large, not UTF-8): `reason` says
    which, in words that follow the file's name."""

    def __init__(self, path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


def read_bytes(path, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. A pipe, device or folder is refused before anything
    is read from it (opening a FIFO does not wait for a writer; /dev/zero is never read), and so is a larger file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileProblem(path, "not found") from None
    except OSError as e:
        raise FileProblem(path, f"cannot be opened ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise FileProblem(path, "is not a regular file (a folder, pipe or device)")
        if st.st_size > limit:
            raise FileProblem(path, f"is {st.st_size:,} bytes, more than the {limit:,} such a file can be")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise FileProblem(path, f"cannot be read ({e.strerror})") from None
    if len(data) > limit:  # grew while it was read
        raise FileProblem(path, f"is more than the {limit:,} bytes such a file can be")
    return data


def read_text(path, limit: int = MAX_TEXT_BYTES) -> str:
    """A regular file's UTF-8 text (see `read_bytes`); a file that is not UTF-8 is a FileProblem naming the line."""
    raw = read_bytes(path, limit)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise FileProblem(path, f"is not UTF-8 text (line {line}, byte 0x{raw[e.start]:02x})") from None


def check_writable_folder(path) -> None:
    """A FileProblem unless `path` is a folder this process can create files in, or can be made as one: its nearest
    existing parent is a folder in which a folder can be made (tried, then removed: permissions alone do not tell a
    read-only mount or /proc)."""
    target = Path(path).expanduser().absolute()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise FileProblem(target, f"cannot be a folder: {probe} is a file" if probe != target else "is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".recipe-write-check-", dir=probe))
    except OSError as e:
        raise FileProblem(target, f"cannot be written ({e.strerror} in {probe})") from None


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
