"""The recipe: one pydantic model per section. Unknown keys are errors; every field says what it does.

Closed choices (data source kind, validation policy, optimizer, scheduler, loss) are discriminated unions on
`type`/`name`; open ones (augmentations, backbones, losses, task kinds) are names looked up in their registries.
One module per group of sections: data.py (data, validation), training.py (transforms, model, train, tasks), and
here the run sections and the Recipe itself.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from framework.recipe.schema.base import _default_tag, _Section
from framework.recipe.schema.data import (BundledSource, CsvSource, DataSection, FileSplit, FolderSource,  # noqa: F401
                                          HoldoutSplit, KFoldSplit, LabelSpec, MaskContestSource, PluginSource,
                                          Source, SourceSplit, TargetSpec, Validation)
from framework.recipe.schema.training import (SGD, AdamW, Constant, Cosine, LossSpec, ModelSection,  # noqa: F401
                                              NormalizeSpec, Optimizer, ResizeSpec, Scheduler, StepLR, TaskSpec,
                                              TrainSection, TransformsSection)
from framework.recipe.schema.tune import TuneSection


class EvalSection(_Section):
    every: int = Field(1, ge=1, description="Validate every N epochs (and always after the last).")
    batch_size: int | None = Field(None, ge=1, description="Default: 2x the training batch size.")
    tta: Literal["hflip"] | None = Field(None, description="hflip: score each image by the average of its outputs "
                                                        "and its mirror image's, in validation (so also when "
                                                        "choosing `best`) and, by default, in predict / evaluate.")
    decision: Literal["argmax", "macro_f1"] = Field(
        "argmax", description="macro_f1: after training, fit per-class offsets on the log-probabilities that "
                              "maximise validation macro-F1 (a rare class is otherwise under-called), on the "
                              "pooled out-of-fold predictions for --all-folds; stored in the run (decision.json) "
                              "and used by predict, evaluate and ensemble.")


class CheckpointSection(_Section):
    every: int = Field(0, ge=0, description="Keep a numbered checkpoint every N epochs (0 = none); `last` and "
                                            "`best` are always kept.")
    keep_last: int = Field(3, ge=1, description="How many numbered checkpoints to keep.")
    monitor: str = Field("val/macro_f1", description="Metric that picks `best` (the contest metric by default).")
    mode: Literal["max", "min"] = Field("max")


class LoggingSection(_Section):
    trackers: list[str] = Field(default_factory=lambda: ["tensorboard"],
                                description="tensorboard, plus any Accelerate tracker (wandb, mlflow, ...).")
    sample_grid: int = Field(16, ge=0, description="Augmented training images shown in TensorBoard at the start.")
    progress: bool = Field(True, description="Show a progress bar per epoch.")
    cam_every: int = Field(0, ge=0, description="Every N validations, log Grad-CAMs of a fixed set of misclassified "
                                                "validation images to TensorBoard (0 = never; needs grad-cam).")
    cam_images: int = Field(8, ge=1, description="How many misclassified validation images the CAMs follow.")


class OutputSection(_Section):
    root: str = Field("runs", description="Folder that holds run folders (relative to the working directory).")


class Recipe(_Section):
    """A complete experiment description."""

    data: DataSection
    tasks: dict[str, TaskSpec] | None = Field(
        None, description="Several heads on one backbone, e.g. {mask: {column: mask_state}, age: {column: age, "
                          "bins: [30, 60]}}. Rows missing a task's label still train the other heads.")
    validation: Validation = Field(default_factory=lambda: HoldoutSplit(type="holdout"),
                                   description="The validation policy (default: grouped, stratified 8:2).")
    transforms: TransformsSection = Field(default_factory=TransformsSection)
    model: ModelSection
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    output: OutputSection = Field(default_factory=OutputSection)
    plugins: list[str] = Field(default_factory=list, description="Plugin files (relative to the recipe) or "
                               "modules to import; they register transforms, backbones, losses and readers.")
    notes: str = Field("", description="Free text, shown in run comparisons.")
    tune: TuneSection | None = Field(None, description="What `recipe tune` searches; `recipe run` ignores it.")

    @model_validator(mode="before")
    @classmethod
    def _default_policy(cls, data):
        return _default_tag(data, "validation", "type", "holdout")

    @model_validator(mode="after")
    def _one_target(self):
        if (self.data.target is None) == (self.tasks is None):
            raise ValueError("give either data.target (one head) or tasks (several heads)")
        if self.tasks is not None and not self.tasks:
            raise ValueError("tasks needs at least one task")
        if self.tasks and "composite" in self.tasks:
            raise ValueError("`composite` is reserved for the combined label; rename that task")
        return self

    def task_specs(self) -> dict[str, "TaskSpec"]:
        """The heads to train: `tasks`, or the single `data.target` as a task named `label`."""
        if self.tasks is not None:
            return dict(self.tasks)
        return {"label": TaskSpec.model_validate(self.data.target.model_dump(exclude_none=True))}
