"""Builders that turn a validated recipe into data, split and pipelines (no torch needed for the data plan)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from framework.data.labels import LabelSet, assign_labels
from framework.data.readers import read_sources
from framework.data.splits import audit, build_split
from framework.errors import DataError, FieldError


@dataclass
class DataPlan:
    """The samples table with labels and the split: everything about the data except pixels."""

    rows: list[dict]
    y: list[int]
    labels: LabelSet
    sides: list[str]
    dropped: int = 0
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # byte-identical (train, val) files

    def indices(self, side: str) -> list[int]:
        return [i for i, s in enumerate(self.sides) if s == side]

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class on each side."""
        out = {}
        for side in ("train", "val"):
            c = Counter(self.y[i] for i in self.indices(side))
            out[side] = {name: c.get(k, 0) for k, name in enumerate(self.labels.classes)}
        return out


def build_data(recipe) -> DataPlan:
    """Read the sources, label the rows, split them and audit the split for leakage."""
    rows = read_sources(recipe.data)
    rows, y, labels, dropped = assign_labels(rows, recipe.data.target, recipe.data.missing_label)
    sides = build_split(rows, y, recipe.validation)
    group_by = getattr(recipe.validation, "group_by", "group")
    errors, dupes = audit(rows, sides, group_by)
    if errors:
        raise FieldError(("validation",), "leakage: " + "; ".join(errors) + ".",
                         "use a grouped policy (holdout/kfold with group_by), or fix the split file so each "
                         "group sits on one side.", DataError)
    plan = DataPlan(rows, y, labels, sides, dropped, dupes)
    check_classes(plan)
    return plan


def check_classes(plan: DataPlan) -> None:
    """Every class must have training images; a class seen only in validation cannot be learned."""
    counts = plan.counts()
    if not plan.indices("train") or not plan.indices("val"):
        raise FieldError(("validation",), f"the split left {len(plan.indices('train'))} training and "
                         f"{len(plan.indices('val'))} validation images.", "adjust the validation policy.", DataError)
    empty = [c for c in plan.labels.classes if counts["train"][c] == 0 and counts["val"][c] == 0]
    only_val = [c for c in plan.labels.classes if counts["train"][c] == 0 and counts["val"][c] > 0]
    problems = []
    if only_val:
        problems.append((("data", "target"), f"class(es) {only_val} appear only in validation "
                         f"({', '.join(str(counts['val'][c]) for c in only_val)} images): the model cannot learn them.",
                         "add training images of these classes, or drop them from `classes`/`map`."))
    if empty and not plan.labels.parts:
        problems.append((("data", "target", "classes"), f"class(es) {empty} have no images at all.",
                         "remove them from `classes`, or add their images."))
    if problems:
        raise FieldError.many(problems, DataError)
