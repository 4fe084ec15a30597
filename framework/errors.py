"""Errors that reach users: each names where the problem is, what is wrong and how to fix it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Issue:
    """One problem in a recipe or its data: where, what, and the fix."""

    message: str
    field: str = ""
    file: str | None = None
    line: int | None = None
    column: int | None = None
    fix: str = ""

    def format(self) -> str:
        where = self.file or ""
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        head = "".join(f"{part}: " for part in (where, self.field) if part)
        text = head + self.message
        if self.fix:
            text += f" Fix: {self.fix}"
        return text


class RecipeError(Exception):
    """A recipe (or what it points to) is wrong; carries every issue found, not just the first."""

    exit_code = 2

    def __init__(self, issues: list[Issue] | Issue | str):
        if isinstance(issues, str):
            issues = [Issue(issues)]
        elif isinstance(issues, Issue):
            issues = [issues]
        self.issues = list(issues)
        super().__init__(self.format())

    def format(self) -> str:
        n = len(self.issues)
        lines = [f"recipe error{'s' if n > 1 else ''} ({n}):"] if n > 1 else []
        lines += [("  - " if n > 1 else "") + i.format() for i in self.issues]
        return "\n".join(lines)


class DataError(RecipeError):
    """The data a recipe names is missing, unreadable or inconsistent."""


class RunError(RecipeError):
    """A run cannot start or continue (existing folder, bad checkpoint, full disk, ...)."""


class Interrupted(RunError):
    """Training stopped on SIGINT / SIGTERM after saving a resumable checkpoint."""

    exit_code = 130


class Pruned(Exception):
    """A hook ended a run early on purpose after a validation (a tuning pruner): the run folder is complete up to
    `epoch`, and its summary says `pruned`, when and why."""

    def __init__(self, epoch: int, why: str):
        self.epoch, self.why = epoch, why
        super().__init__(f"pruned after epoch {epoch}: {why}")


def did_you_mean(name: str, choices, n: int = 3) -> str:
    """' Did you mean X?' for the nearest choices, or '' when none is close."""
    import difflib

    choices = [str(c) for c in choices]
    near = difflib.get_close_matches(str(name), choices, n=n, cutoff=0.6)
    if not near:
        lower = {c.lower(): c for c in choices}
        near = [lower[m] for m in difflib.get_close_matches(str(name).lower(), list(lower), n=n, cutoff=0.6)]
    if not near:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in near) + "?"


class FieldError(Exception):
    """Raised by builders: problems tied to recipe fields (key paths such as ("data", "sources", 0, "manifest")).

    Builders do not know where a field was written; the API layer turns these into located `Issue`s."""

    def __init__(self, path: tuple, message: str, fix: str = "", kind: type[RecipeError] = RecipeError):
        self.items = [(tuple(path), message, fix)]
        self.kind = kind
        super().__init__(message)

    @classmethod
    def many(cls, items: list[tuple[tuple, str, str]], kind: type[RecipeError] = RecipeError) -> "FieldError":
        err = cls(items[0][0], items[0][1], items[0][2], kind)
        err.items = list(items)
        return err


def shorten(text: str, limit: int = 200) -> str:
    """The first line of `text`, cut at a word boundary (with an ellipsis) when longer than `limit`."""
    first = (text.splitlines() or [""])[0]
    if len(first) <= limit:
        return first
    return first[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
