"""The contest's submission file: its own CSV (info.csv: `ImageID,ans`) with every row, column and order kept, and
the answer column filled with the class index the contest scores, `mask*6 + gender*3 + age`.

The index is the composite answer of the run (its joint 18-class choice, after its decision rule, if any): the same
answer the prediction CSV's question columns are derived from. A run whose questions or classes are not the
contest's 18 is refused, since its index would mean other classes. The mapping from index to classes is written
beside the file (`<out>.classes.csv`).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from framework.errors import Issue, RunError

# The contest's classes, in the order its index counts them (index = mask*6 + gender*3 + age).
CONTEST = {"mask": ["wear", "incorrect", "not_wear"], "gender": ["male", "female"], "age": ["<30", "30-59", "60+"]}


def contest_order(run) -> list[str]:
    """The run's questions that answer the contest's mask, gender and age, in the contest's order; a RunError when
    the run cannot answer the contest's 18 classes (other questions, classes or class order)."""
    classes = run.questions()
    order = run.composite_order() or []
    if [classes.get(q) for q in order] != list(CONTEST.values()):
        have = "; ".join(f"{q}: {classes[q]}" for q in order) or "; ".join(f"{q}: {c}" for q, c in classes.items())
        want = "; ".join(f"{q}: {c}" for q, c in CONTEST.items())
        raise RunError(Issue(f"the run's answer ({have}) is not the contest's 18 classes ({want}), so its index would "
                             "name other classes.", field="--answer",
                             fix="train with the contest's composite target (README: the contest layout), or leave "
                                 "--answer out and use the prediction CSV's composite_index."))
    return order


def write_submission(out: Path, images, answer: str, index: dict[int, int]) -> tuple[Path, int]:
    """The input CSV's rows, columns and order, with `answer` set to each image's index (`index`: row position ->
    class index; a row missing from it, an unreadable image, is left empty). Returns (mapping file, empty rows)."""
    from framework.io import atomic_write_text

    header = list(images.header) + ([answer] if answer not in images.header else [])
    lines = _csv_text([header] + [[str(index.get(i, "")) if c == answer else (r.get(c) or "") for c in header]
                                  for i, r in enumerate(images.rows)])
    atomic_write_text(out, lines)
    mapping = out.with_name(out.stem + ".classes.csv")
    names = [(m, g, a) for m in CONTEST["mask"] for g in CONTEST["gender"] for a in CONTEST["age"]]
    atomic_write_text(mapping, _csv_text([["index", *CONTEST], *[[i, *n] for i, n in enumerate(names)]]))
    return mapping, len(images.rows) - len(index)


def contest_index(picks: dict[str, np.ndarray], order: list[str]) -> np.ndarray:
    """mask*6 + gender*3 + age from each question's class index."""
    from framework.data.labels import LabelSet

    return LabelSet.composite(CONTEST).encode([picks[q] for q in order])


def _csv_text(rows) -> str:
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()
