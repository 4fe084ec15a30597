"""A run folder as a format: every file's name, and every read and write of it, in one place.

    recipe.resolved.yaml  the recipe with every default filled in (what the run reruns and resumes from)
    split.csv             every image with its source, group, side and labels
    labels.json           task -> classes in head order (and a composite head's parts)
    summary.json          what the run is and how far it got
    metrics.jsonl         one record per epoch
    checkpoints/          last.pt, best.pt, epoch_NNNN.pt
    decision.json, calibration.json, cam_images.json, skipped.csv, tb/

Reads check what they get (files.py's models, and consistency with each other); a damaged or edited file is a
RunError naming the file, the field and the fix. Writes are atomic.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from framework.errors import FieldError, RecipeError
from framework.folders.files import (Calibration, CamImages, Decision, Labels, Summary, checked, damaged, read_checked,
                                     read_json)
from framework.io import FileProblem, atomic_write_text, read_text, write_json

SIDES = ("train", "val", "unused")
MAX_METRICS_BYTES = 256 << 20
MAX_SPLIT_BYTES = 512 << 20
AGAIN = "train the run again, or restore the file from a copy of the folder."


class RunFolder:
    """The files of one run folder."""

    RECIPE, SPLIT, LABELS, SUMMARY = "recipe.resolved.yaml", "split.csv", "labels.json", "summary.json"
    METRICS, DECISION, CALIBRATION, CAM_IMAGES = "metrics.jsonl", "decision.json", "calibration.json", "cam_images.json"
    CHECKPOINTS, SKIPPED, TB = "checkpoints", "skipped.csv", "tb"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def recipe_file(self) -> Path:
        return self.path / self.RECIPE

    def is_run(self) -> bool:
        """Whether the folder looks like a run folder (its resolved recipe is there); says nothing of its health."""
        return self.recipe_file.is_file()

    # ------------------------------------------------------------------------------------------ checkpoints
    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    def checkpoint(self, name: str) -> Path:
        """checkpoints/<name>.pt (name: last, best, epoch_0005)."""
        return self.checkpoints / f"{name}.pt"

    def has_checkpoint(self) -> bool:
        return self.checkpoints.is_dir() and any(self.checkpoints.glob("*.pt"))

    # ------------------------------------------------------------------------------------------ the recipe
    def write_recipe(self, text: str) -> None:
        atomic_write_text(self.recipe_file, text)

    def recipe_dict(self) -> dict:
        """recipe.resolved.yaml as plain data (for comparing runs; `load_recipe` validates it for a run)."""
        import yaml

        try:
            data = yaml.safe_load(read_text(self.recipe_file, 4 << 20))
        except FileProblem as e:
            raise damaged(self.recipe_file, f"the run's recipe {e.reason}.", fix=AGAIN) from None
        except yaml.YAMLError as e:
            raise damaged(self.recipe_file, f"the run's recipe is not valid YAML ({str(e).splitlines()[0]}).",
                          fix=AGAIN) from None
        if not isinstance(data, dict):
            raise damaged(self.recipe_file, f"the run's recipe holds a {type(data).__name__}, not a recipe.", fix=AGAIN)
        return data

    # ------------------------------------------------------------------------------------------ summary.json
    def write_summary(self, summary: dict) -> None:
        write_json(self.file(self.SUMMARY), summary)

    def summary(self) -> dict:
        """summary.json, checked (its extra fields kept as written)."""
        path = self.file(self.SUMMARY)
        data = read_json(path, "the run's summary", fix=AGAIN)
        checked(Summary, data, path, "the run's summary", fix=AGAIN)
        return data

    def summary_or_none(self) -> dict | None:
        """summary.json, or None when the folder has none (a run that never started); damaged: a RunError."""
        return self.summary() if self.file(self.SUMMARY).exists() else None

    # ------------------------------------------------------------------------------------------ labels.json
    def write_labels(self, labels: dict) -> None:
        write_json(self.file(self.LABELS), {task: lab.to_json() for task, lab in labels.items()})

    def labels(self, classes: dict[str, list[str]] | None = None) -> dict:
        """Task -> LabelSet. `classes` (the checkpoint's classes per task, in head order) must agree: a label file
        with permuted, missing or extra classes would name every prediction wrongly."""
        from framework.data.labels import LabelSet

        path = self.file(self.LABELS)
        entries = read_checked(path, Labels, "the run's label file", fix=AGAIN).root
        if classes is not None:
            theirs = {t: e.classes for t, e in entries.items()}
            if theirs != {t: list(c) for t, c in classes.items()}:
                raise damaged(path, f"the classes here ({_short(theirs)}) are not those the checkpoint's heads were "
                              f"trained on ({_short(classes)}).", field="classes",
                              fix="restore labels.json from a copy of the run folder (it must not be edited).")
        return {t: LabelSet(list(e.classes), e.parts) for t, e in entries.items()}

    # ------------------------------------------------------------------------------------------ split.csv
    def write_split(self, plan) -> None:
        from framework.data.splits import write_split

        write_split(self.file(self.SPLIT), plan)

    def split_rows(self, side: str | None = None, tasks=()) -> list[dict]:
        """split.csv's rows (of one side), checked: its columns, the side of every row, a path on every row."""
        from framework.data.readers import read_table

        path = self.file(self.SPLIT)
        if not path.exists():
            raise damaged(path, "the run's split file is missing.", fix=AGAIN)
        try:
            header, rows = read_table(path, ())
        except FieldError as e:
            raise damaged(path, e.items[0][1], fix=AGAIN) from None
        missing = [c for c in ("path", "source", "group", "split", *tasks) if c not in header]
        if missing:
            raise damaged(path, f"the split file has no column {missing[0]!r} (columns: {header}).", fix=AGAIN)
        for i, r in enumerate(rows, start=2):
            if r["split"] not in SIDES or not r["path"] or None in r or any(v is None for v in r.values()):
                raise damaged(path, f"line {i} is not a row of a split file (side {r['split']!r}, path "
                              f"{r['path']!r}, {len(r)} columns).", field=f"line {i}", fix=AGAIN)
        return [r for r in rows if side is None or r["split"] == side]

    def split_pairs(self) -> list[tuple[str, str]]:
        return [(r["path"], r["split"]) for r in self.split_rows()]

    # ------------------------------------------------------------------------------------------ metrics.jsonl
    def append_metrics(self, record: dict) -> None:
        with open(self.file(self.METRICS), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def trim_metrics(self, start_epoch: int) -> None:
        """On resume: keep the records of epochs before `start_epoch` (a crashed run may have written later ones,
        and its last line may be cut short)."""
        if self.file(self.METRICS).exists():
            kept = [r for r in self.metrics(tolerate_cut=True) if r["epoch"] < start_epoch]
            atomic_write_text(self.file(self.METRICS), "".join(json.dumps(r) + "\n" for r in kept))

    def metrics(self, tolerate_cut: bool = True) -> list[dict]:
        """The epoch records, checked: each line a JSON object with an `epoch` above the one before and a `train`
        record. A last line cut short by a crash is left out (`tolerate_cut`); anything else is a RunError."""
        path = self.file(self.METRICS)
        if not path.exists():
            return []
        try:
            lines = read_text(path, MAX_METRICS_BYTES).split("\n")
        except FileProblem as e:
            raise damaged(path, f"the run's metrics file {e.reason}.", fix=AGAIN) from None
        records, last = [], 0
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                if tolerate_cut and n == len(lines):  # no newline after it: a write cut short
                    break
                raise damaged(path, f"line {n} is not a JSON record.", field=f"line {n}", fix=AGAIN) from None
            problem = _record_problem(rec, last)
            if problem:
                raise damaged(path, f"line {n} {problem}.", field=f"line {n}", fix=AGAIN)
            records.append(rec)
            last = rec["epoch"]
        return records

    def kept_record(self, best_epoch: int | None) -> dict | None:
        """The record of the epoch whose checkpoint the run kept as `best` (else the last validated one); None
        when no epoch was validated."""
        validated = [r for r in self.metrics() if "val" in r]
        if not validated:
            return None
        return next((r for r in validated if r["epoch"] == best_epoch), validated[-1])

    # ------------------------------------------------------------------------------- decision, calibration, CAM
    def decision(self) -> dict | None:
        """decision.json (None when the run has none), checked: every offset a finite number."""
        return self._optional(self.DECISION, Decision, "the decision rule",
                              "remove decision.json (predictions then use the argmax) or fit it again with "
                              "`recipe evaluate RUN --decision macro_f1`.")

    def write_decision(self, data: dict) -> None:
        write_json(self.file(self.DECISION), data)

    def calibration(self) -> dict | None:
        return self._optional(self.CALIBRATION, Calibration, "the calibration",
                              "remove calibration.json: it is fitted again when needed.")

    def write_calibration(self, data: dict) -> None:
        write_json(self.file(self.CALIBRATION), data)

    def cam_images(self) -> dict | None:
        """cam_images.json, checked: the Grad-CAM images must be validation images of this run."""
        data = self._optional(self.CAM_IMAGES, CamImages, "the Grad-CAM image list",
                              "remove cam_images.json: the images are chosen again.")
        if data is not None:
            val = {r["path"] for r in self.split_rows("val")}
            outside = [p for p in data["paths"] if p not in val]
            if outside:
                raise damaged(self.file(self.CAM_IMAGES), f"{outside[0]!r} is not a validation image of this run.",
                              field="paths", fix="remove cam_images.json: the images are chosen again.")
        return data

    def write_cam_images(self, data: dict) -> None:
        write_json(self.file(self.CAM_IMAGES), data)

    def _optional(self, name: str, model, what: str, fix: str) -> dict | None:
        path = self.file(name)
        if not os.path.lexists(path):
            return None
        data = read_json(path, what, fix)
        checked(model, data, path, what, fix)
        return data


def _record_problem(rec, last: int) -> str | None:
    """Why a metrics line is not an epoch record after epoch `last`, or None."""
    if not isinstance(rec, dict):
        return f"holds a {type(rec).__name__}, not an epoch record"
    epoch = rec.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch <= last:
        return f"has epoch {epoch!r}, not a whole number after {last}"
    for side in ("train", "val"):
        if side in rec and not (isinstance(rec[side], dict) and isinstance(rec[side].get("macro_f1"), (int, float))):
            return f"has a `{side}` part without its macro_f1"
    if "train" not in rec:
        return "has no `train` part"
    return None


def paths_outside_data(paths: list[str], data_cfg) -> list[str]:
    """The paths a run folder names that its recipe's data does not hold: outside data.root and not listed by any
    of its sources now. A shared run folder must not make a command read /etc/passwd or a device."""
    root = os.path.realpath(str(data_cfg.root))
    outside = [p for p in paths if not _under(os.path.realpath(p), root)]
    if not outside:
        return []
    try:
        from framework.data.readers import read_sources

        listed = {os.path.realpath(r["path"]) for r in read_sources(data_cfg)}
    except (RecipeError, FieldError):  # the data moved: nothing outside data.root is known to be its
        listed = set()
    return [p for p in outside if os.path.realpath(p) not in listed]


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 160 else text[:157] + "..."
