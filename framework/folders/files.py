"""What each file of a run or export folder holds, as typed models checked on read (like the recipe's schema).

A run or export folder is handed around (a teammate's run, a downloaded export), so nothing in it is trusted: a
file that is missing, damaged or edited is a `RunError` naming the file, the field and the fix, never a traceback
and never a silent default. Numbers a prediction depends on (offsets, calibration, check figures) must be finite.
Models allow extra keys where the framework adds fields over time (a summary); the fields it reads are typed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, field_validator, model_validator

from framework.errors import Issue, RunError
from framework.io import FileProblem, read_text

Finite = Annotated[float, Field(allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1, max_length=500)]
MAX_JSON_BYTES = 64 << 20


class _File(BaseModel):
    model_config = ConfigDict(extra="allow")


class Process(_File):
    host: str
    pid: int


class Summary(_File):
    """summary.json: what a run is and how far it got (written at the start, after each epoch and at the end)."""

    name: Name
    status: Literal["running", "finished", "failed", "interrupted", "pruned"]
    started: str = ""
    recipe: str = ""
    notes: str | None = None
    overrides: list[str] = []
    backbone: str = ""
    classes: dict[str, list[str]] = {}
    epochs_done: int = Field(0, ge=0)
    best_metric: str | None = None
    best_value: float | None = None  # (NaN when a diverged run monitored its loss)
    best_epoch: int | None = Field(None, ge=1)
    wall_seconds: float = Field(0.0, ge=0)
    image_size: list[Annotated[int, Field(ge=1)]] = []
    process: Process | None = None
    fast_dev_run: int | None = Field(None, ge=1)
    error: str | None = None


class LabelsEntry(BaseModel):
    """One task of labels.json: its classes in head order, and a composite head's parts."""

    model_config = ConfigDict(extra="forbid")
    classes: list[Name] = Field(min_length=1)
    parts: dict[Name, list[Name]] | None = None
    formula: str | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("a class is listed twice")
        if self.parts is not None:
            size = math.prod(len(v) for v in self.parts.values())
            if size != len(self.classes):
                raise ValueError(f"the parts give {size} combinations, but there are {len(self.classes)} classes")
        return self


class Labels(RootModel[Annotated[dict[Name, LabelsEntry], Field(min_length=1)]]):
    """labels.json: task -> its classes."""


class DecisionEntry(_File):
    offsets: dict[str, Finite]
    kept: Literal["offsets", "argmax"] = "offsets"


class Decision(_File):
    """decision.json: the macro-F1 decision rule's per-class offsets, for one checkpoint (by content)."""

    checkpoint: str
    fitted_on: str = ""
    summary: str = ""
    questions: dict[str, DecisionEntry]


class CalibrationEntry(_File):
    temperature: Finite = Field(gt=0)
    bias: list[Finite]
    prior: list[Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]]


class Calibration(_File):
    """calibration.json: bias-corrected temperature scaling per question, for one checkpoint and TTA."""

    checkpoint: str
    questions: dict[str, CalibrationEntry]


class CamImages(BaseModel):
    """cam_images.json: the validation images Grad-CAM follows through a run (chosen once, kept on resume)."""

    model_config = ConfigDict(extra="forbid")
    paths: list[Name]
    boxes: list[tuple[Finite, Finite, Finite, Finite] | None]

    @model_validator(mode="after")
    def _same_length(self):
        if len(self.paths) != len(self.boxes):
            raise ValueError(f"{len(self.paths)} paths but {len(self.boxes)} boxes")
        return self


class Check(_File):
    images: int = Field(ge=0)
    on: str
    max_abs_difference: Finite = Field(ge=0)
    tolerance: Finite


class InputSpec(_File):
    size: tuple[Annotated[int, Field(ge=8, le=8192)], Annotated[int, Field(ge=8, le=8192)]]


class ExportInfo(_File):
    """export.json: what an exported model takes and gives, and where it came from."""

    format: Literal["onnx", "torchscript"]
    file: Literal["model.onnx", "model.pt"]
    input: InputSpec
    outputs: list[Name] = Field(min_length=1)
    labels: dict[Name, LabelsEntry] = Field(min_length=1)
    tta: Literal["none", "hflip"]
    resize: dict[str, Any]
    box_columns: list[list[str] | None]
    train_counts: dict[str, dict[str, Annotated[int, Field(ge=0)]]] | None = None
    composite_counts: dict[str, Annotated[int, Field(ge=0)]] | None = None
    check: Check
    finished: bool = True
    decision: dict[str, dict[str, Finite] | None] | None = None

    @model_validator(mode="after")
    def _file_of_format(self):
        want = {"onnx": "model.onnx", "torchscript": "model.pt"}[self.format]
        if self.file != want:
            raise ValueError(f"a {self.format} export's model file is {want}, not {self.file}")
        return self

    @field_validator("outputs")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("an output is listed twice")
        return v


def damaged(path: Path, message: str, field: str = "", fix: str = "") -> RunError:
    """The error for a run or export folder's file that is missing, damaged or edited."""
    return RunError(Issue(message, field=field, file=str(path),
                          fix=fix or "restore the file from a copy of the folder, or make the folder again "
                                     "(train the run again, or export it again)."))


def read_json(path: Path, what: str, fix: str = "") -> Any:
    """A folder's JSON file, read as a regular file of bounded size."""
    try:
        text = read_text(path, MAX_JSON_BYTES)
    except FileProblem as e:
        raise damaged(path, f"{what} {e.reason}.", fix=fix) from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise damaged(path, f"{what} is not valid JSON ({e}).", fix=fix) from None


def checked(model: type[BaseModel], data: Any, path: Path, what: str, fix: str = ""):
    """`data` validated as `model`, or a RunError naming the file and every field that is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        issues = [Issue(f"{what}: {err['msg']} (got {_shown(err.get('input'))}).",
                        field=".".join(str(x) for x in err["loc"]) or "(the whole file)", file=str(path),
                        fix=fix or "restore the file from a copy of the folder, or make the folder again.")
                  for err in e.errors(include_url=False)[:8]]
        raise RunError(issues) from None


def read_checked(path: Path, model: type[BaseModel], what: str, fix: str = ""):
    return checked(model, read_json(path, what, fix), path, what, fix)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
