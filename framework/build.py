"""Builders that turn a validated recipe into data, split and pipelines (no torch needed for the data plan)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from framework.data.labels import LabelSet, assign_tasks, task_path
from framework.data.readers import read_sources
from framework.data.splits import audit, build_split
from framework.errors import DataError, FieldError


@dataclass
class DataPlan:
    """The samples table with each task's labels and the split: everything about the data except pixels."""

    rows: list[dict]
    ys: dict[str, list[int]]  # task -> class index per row, -1 where the row has no label for that task
    labels: dict[str, LabelSet]  # task -> its classes
    sides: list[str]
    dropped: int = 0
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # byte-identical (train, val) files
    named_tasks: bool = False  # tasks come from the recipe's `tasks` (else the single data.target, "label")
    values: dict[str, list[float]] = field(default_factory=dict)  # regression task -> the number per row (NaN)

    def indices(self, side: str) -> list[int]:
        return [i for i, s in enumerate(self.sides) if s == side]

    @property
    def strata(self) -> list[int]:
        """One stratum per combination of task labels (what `stratify: true` balances)."""
        keys = list(zip(*self.ys.values()))
        ids = {k: n for n, k in enumerate(sorted(set(keys)))}
        return [ids[k] for k in keys]

    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """Images per class of each task on each side: counts[side][task][class]."""
        out: dict = {}
        for side in ("train", "val"):
            idx = self.indices(side)
            out[side] = {}
            for task, labels in self.labels.items():
                c = Counter(self.ys[task][i] for i in idx)
                out[side][task] = {name: c.get(k, 0) for k, name in enumerate(labels.classes)}
        return out

    def describe(self) -> str:
        """`task: class train/val, ...` for logs."""
        counts = self.counts()
        lines = []
        for task, labels in self.labels.items():
            prefix = f"{task}: " if self.named_tasks else ""
            lines.append(prefix + ", ".join(f"{c} {counts['train'][task][c]}/{counts['val'][task][c]}"
                                            for c in labels.classes if counts['train'][task][c] or counts['val'][task][c]))
        return "; ".join(lines)


def build_data(recipe) -> DataPlan:
    """Read the sources, label the rows for every task, split them and audit the split for leakage."""
    rows = read_sources(recipe.data)
    named = recipe.tasks is not None
    rows, ys, labels, dropped = assign_tasks(rows, recipe.task_specs(), recipe.data.missing_label, named)
    plan = DataPlan(rows, ys, labels, [], dropped, named_tasks=named)
    from framework.data.labels import numbers
    plan.values = {t: numbers(rows, s.column) for t, s in recipe.task_specs().items() if s.kind == "regression"}
    train_only = {s.name for s in recipe.data.sources if getattr(s, "train_only", False)}
    plan.sides = build_split(rows, plan.strata, recipe.validation, train_only)
    group_by = getattr(recipe.validation, "group_by", "group")
    errors, plan.duplicates = audit(rows, plan.sides, group_by)
    if errors:
        raise FieldError(("validation",), "leakage: " + "; ".join(errors) + ".",
                         "use a grouped policy (holdout/kfold with group_by), or fix the split file so each "
                         "group sits on one side.", DataError)
    check_classes(plan)
    return plan


def check_classes(plan: DataPlan) -> None:
    """Every class must have training images; a class seen only in validation cannot be learned."""
    if not plan.indices("train") or not plan.indices("val"):
        raise FieldError(("validation",), f"the split left {len(plan.indices('train'))} training and "
                         f"{len(plan.indices('val'))} validation images.", "adjust the validation policy.", DataError)
    counts = plan.counts()
    problems = []
    for task, labels in plan.labels.items():
        where = task_path(plan.named_tasks, task)
        train, val = counts["train"][task], counts["val"][task]
        only_val = [c for c in labels.classes if train[c] == 0 and val[c] > 0]
        empty = [c for c in labels.classes if train[c] == 0 and val[c] == 0]
        name = f"task {task!r}: " if plan.named_tasks else ""
        if only_val:
            problems.append((where, f"{name}class(es) {only_val} appear only in validation "
                             f"({', '.join(str(val[c]) for c in only_val)} images): the model cannot learn them.",
                             "add training images of these classes, or drop them from `classes`/`map`."))
        if empty and not labels.parts:
            problems.append((where + ("classes",), f"{name}class(es) {empty} have no images at all.",
                             "remove them from `classes`, or add their images."))
    if problems:
        raise FieldError.many(problems, DataError)
