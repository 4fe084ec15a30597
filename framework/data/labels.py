"""Label definitions -> class indices: value maps, numeric bins, composite labels, missing labels."""
from __future__ import annotations

import math
from dataclasses import dataclass

from framework.errors import DataError, FieldError, did_you_mean


@dataclass(frozen=True)
class LabelSet:
    """The classes of one task and, for a composite label, the parts it is made of: the one codec of composite
    indices (mixed radix in part order, e.g. index = mask*6 + gender*3 + age for 3 x 2 x 3 classes)."""

    classes: list[str]
    parts: dict[str, list[str]] | None = None  # composite: part name -> its classes, in index order

    @classmethod
    def composite(cls, parts: dict[str, list[str]]) -> "LabelSet":
        """The label set whose classes are every combination of the parts' classes ('wear/male/<30', ...)."""
        names = [""]
        for classes in parts.values():
            names = [cls.joined([a, b]) if a else b for a in names for b in classes]
        return cls(names, {p: list(c) for p, c in parts.items()})

    @staticmethod
    def joined(names) -> str:
        """One name for several classes: a composite class's name from its parts' ('wear/male/<30'), or a caption
        of one image's classes over several tasks."""
        return "/".join(names)

    def part_names(self, name: str) -> dict[str, str]:
        """A composite class's part classes, by part (looked up, so a class name may itself hold a '/')."""
        code = self.classes.index(name)
        return {part: self.parts[part][int(k)] for part, k in self.decode(code).items()}

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in (self.parts or {"": self.classes}).values()]

    def encode(self, part_codes: list):
        """Composite index from each part's class index, in part order (ints, or equal-length numpy arrays);
        -1 (no label) in any part gives -1."""
        import numpy as np

        arrays = [np.asarray(c, dtype=np.int64) for c in part_codes]
        code = np.zeros_like(arrays[0])
        for a, n in zip(arrays, self.sizes):
            code = code * n + a
        missing = np.any([a < 0 for a in arrays], axis=0)
        code = np.where(missing, -1, code)
        return int(code) if code.ndim == 0 else code

    def decode(self, codes) -> dict:
        """Each part's class index from composite indices (-1 stays -1 in every part)."""
        import numpy as np

        codes = np.asarray(codes, dtype=np.int64)
        out, rest = {}, codes.copy()
        for name, n in reversed(list(zip(self.parts, self.sizes))):
            out[name] = np.where(codes >= 0, rest % n, -1)
            rest = rest // n
        return {name: out[name] for name in self.parts}

    def marginals(self, probs) -> dict:
        """Each part's probabilities (N, n_part) from the composite's (N, C): summed over the other parts."""
        joint = probs.reshape(len(probs), *self.sizes)
        axes = range(1, len(self.sizes) + 1)
        return {name: joint.sum(axis=tuple(a for a in axes if a != k + 1)) for k, name in enumerate(self.parts)}

    @property
    def formula(self) -> str:
        """How a composite index is computed, written out (e.g. `mask*6 + gender*3 + age`)."""
        if not self.parts:
            return "index of the class in `classes`"
        sizes = self.sizes
        terms = []
        for i, name in enumerate(self.parts):
            stride = math.prod(sizes[i + 1:])
            terms.append(f"{name}*{stride}" if stride > 1 else name)
        return " + ".join(terms)

    def to_json(self) -> dict:
        return {"classes": self.classes, "parts": self.parts, "formula": self.formula}

    @classmethod
    def from_json(cls, data: dict) -> "LabelSet":
        return cls(list(data["classes"]), data.get("parts"))


def bin_names(bins: list[float]) -> list[str]:
    """[30, 60] -> ['<30', '30-59', '60+'] for whole-number cuts, else half-open intervals."""
    if all(float(b).is_integer() for b in bins):
        b = [int(x) for x in bins]
        return [f"<{b[0]}"] + [f"{lo}-{hi - 1}" for lo, hi in zip(b, b[1:])] + [f"{b[-1]}+"]
    return [f"<{bins[0]:g}"] + [f"[{lo:g},{hi:g})" for lo, hi in zip(bins, bins[1:])] + [f">={bins[-1]:g}"]


def _bin(value: float, bins: list[float]) -> int:
    i = 0
    while i < len(bins) and value >= bins[i]:
        i += 1
    return i


def _classes_of(spec) -> list[str] | None:
    if spec.bins is not None:
        return list(spec.classes) if spec.classes else bin_names(spec.bins)
    return list(spec.classes) if spec.classes else None


def label_value(row: dict, spec, where: tuple, lenient: bool = False) -> str | None:
    """The row's value for one label spec as a class name, or None when missing. `lenient`: a source without
    the column has no label for it (several tasks from different sources); else that is an error."""
    if spec.column not in row and lenient:
        return None
    if spec.column not in row:
        columns = [k for k in row if not k.startswith("_") and k != "box"]
        raise FieldError(where + ("column",), f"column {spec.column!r} is not in source {row.get('source')!r}."
                         f"{did_you_mean(spec.column, columns)}",
                         f"name a column that every source provides; this one has: {', '.join(columns)}.", DataError)
    value = row[spec.column]
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    value = str(value).strip()
    if spec.bins is not None:
        try:
            number = float(value)
        except ValueError:
            raise FieldError(where + ("bins",), f"{row.get('_line') or row['path']}: {spec.column}={value!r} is not "
                             "a number, so it cannot be binned.", "fix the value or drop `bins`.", DataError) from None
        return _classes_of(spec)[_bin(number, spec.bins)]
    if spec.map:
        value = spec.map.get(value, value)
    return value


def encode(rows: list[dict], target, where: tuple, lenient: bool = False) -> tuple[list[int | None], LabelSet]:
    """Each row's class index for one target (None where the row has no label), and the label set.
    `lenient`: rows of sources that lack the column have no label (the column must exist somewhere)."""
    parts = target.composite or {"": target}
    part_values: dict[str, list] = {}
    for name, spec in parts.items():
        w = where + (("composite", name) if name else ())
        if lenient and not any(spec.column in r for r in rows):
            label_value(rows[0], spec, w)  # raises the missing-column error, with a did-you-mean
        part_values[name] = [label_value(r, spec, w, lenient) for r in rows]
    present = [all(part_values[n][i] is not None for n in parts) for i in range(len(rows))]
    part_classes: dict[str, list[str]] = {}
    for name, spec in parts.items():
        declared = _classes_of(spec)
        found = sorted({v for v, ok in zip(part_values[name], present) if ok})
        if declared is None:
            part_classes[name] = found
            continue
        unknown = [v for v in found if v not in declared]
        if unknown:
            w = where + (("composite", name) if name else ()) + ("classes",)
            counts = {v: sum(1 for x, ok in zip(part_values[name], present) if ok and x == v) for v in unknown}
            listed = ", ".join(f"{v!r} ({n} row{'s' if n > 1 else ''})" for v, n in list(counts.items())[:8])
            raise FieldError(w, f"label value(s) of column {spec.column!r} that are not declared classes {declared}: "
                             f"{listed}{' ...' if len(counts) > 8 else ''}.",
                             "add them to `classes`, rename them with `map` (e.g. a typo onto its class), or drop "
                             "those rows with a source `filter`.", DataError)
        part_classes[name] = declared
    index = {n: {c: k for k, c in enumerate(cl)} for n, cl in part_classes.items()}
    labels = LabelSet.composite(part_classes) if target.composite else LabelSet(part_classes[""])
    part_codes = [[index[n].get(v, -1) if v is not None else -1 for v in part_values[n]] for n in parts]
    codes = labels.encode(part_codes) if rows else []
    return [int(c) if c >= 0 else None for c in codes], labels


def task_path(recipe_has_tasks: bool, name: str) -> tuple:
    """Where a task's label definition sits in the recipe."""
    return ("tasks", name) if recipe_has_tasks else ("data", "target")


def assign_tasks(rows: list[dict], tasks: dict, missing: str = "drop", named: bool = True):
    """Rows that keep at least one label; per task, each row's class index (-1 = no label) and the label set;
    and how many rows were dropped. A row missing some tasks' labels still trains the others."""
    codes, labels = {}, {}
    for name, spec in tasks.items():
        codes[name], labels[name] = encode(rows, spec, task_path(named, name), lenient=named)
    keep = [i for i in range(len(rows)) if any(codes[t][i] is not None for t in tasks)]
    dropped = len(rows) - len(keep)
    if dropped and missing == "error":
        first = next(i for i in range(len(rows)) if all(codes[t][i] is None for t in tasks))
        raise FieldError(("data", "missing_label"), f"{dropped} rows have no label, e.g. "
                         f"{rows[first].get('_line') or rows[first]['path']}.",
                         "fill in the labels, or set data.missing_label: drop.", DataError)
    if not keep:
        raise FieldError(task_path(named, next(iter(tasks))), "no row has a label.",
                         "check the label column and `map`.", DataError)
    ys = {t: [-1 if codes[t][i] is None else codes[t][i] for i in keep] for t in tasks}
    return [rows[i] for i in keep], ys, labels, dropped


def numbers(rows: list[dict], column: str) -> list[float]:
    """The numeric value of `column` per row (NaN where missing): what a regression task learns."""
    out = []
    for r in rows:
        try:
            out.append(float(r.get(column, "")))
        except (TypeError, ValueError):
            out.append(float("nan"))
    return out


def assign_labels(rows: list[dict], target, missing: str = "drop") -> tuple[list[dict], list[int], LabelSet, int]:
    """One target: rows that have its label, their class indices, the label set, and how many were dropped."""
    kept, ys, labels, dropped = assign_tasks(rows, {"label": target}, missing, named=False)
    return kept, ys["label"], labels["label"], dropped
