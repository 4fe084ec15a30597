"""The recipe: one pydantic model per section. Unknown keys are errors; every field says what it does.

Closed choices (data source kind, validation policy, optimizer, scheduler, loss) are discriminated unions on
`type`/`name`; open ones (augmentations, backbones) are names checked against albumentations / timm at build time.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


# ----------------------------------------------------------------------------------------------------- data
_TRAIN_ONLY = Field(False, description="Extra training data: these rows always train and are never validated on; "
                                       "the validation policy splits the other sources alone (their split is the "
                                       "same with or without this one). Rows whose group is in validation are "
                                       "left out (`unused` in split.csv).")


class _Source(_Section):
    train_only: bool = _TRAIN_ONLY


class FolderSource(_Source):
    """Images in one sub-folder per class: `<path>/<class>/<image>`."""

    type: Literal["folder"]
    name: str = Field(description="Name of the source, used by `validation: {type: source}` and in reports.")
    path: str = Field(description="Folder holding one sub-folder per class (relative to data.root).")
    column: str = Field("label", description="Column that receives the sub-folder name.")


class CsvSource(_Source):
    """A manifest CSV: one row per image, a path column and label columns."""

    type: Literal["csv"]
    name: str = Field(description="Name of the source.")
    manifest: str = Field(description="CSV file (relative to data.root).")
    root: str | None = Field(None, description="Folder the image paths are relative to (default: the CSV's folder).")
    path_column: str = Field("path", description="Column with the image path.")
    group_column: str | None = Field(None, description="Column with a group id (person, duplicate group); "
                                                       "a group never sits on both sides of a split.")
    box_columns: list[str] | None = Field(None, min_length=4, max_length=4,
                                          description="Face box columns xmin, ymin, xmax, ymax in image pixels.")
    filter: dict[str, list[Any]] | None = Field(None, description="Keep only rows whose column value is listed, "
                                                                  "e.g. {subtype: [Mask, Mask_Chin]}.")


class MaskContestSource(_Source):
    """The contest layout: `<path>/<ID>_<gender>_<race>_<age>/{mask1..mask5,incorrect_mask,normal}.<ext>`.

    Yields columns mask_state (wear / incorrect / not_wear), gender, race, age and person (also the group)."""

    type: Literal["mask_contest"]
    name: str = Field(description="Name of the source.")
    path: str = Field(description="Folder holding one folder per person (relative to data.root).")


class BundledSource(_Source):
    """Real images that ship inside an installed package, written out as files on first use."""

    type: Literal["bundled"]
    name: str = Field(description="Name of the source.")
    dataset: Literal["lfw_subset", "digits"] = Field(
        description="lfw_subset: scikit-image's 100 faces + 100 non-faces (25 px); digits: scikit-learn's 8x8 digits.")
    cache_dir: str | None = Field(None, description="Where the image files are written "
                                                    "(default: ~/.cache/recipe/<dataset>).")


class PluginSource(BaseModel):
    """A source read by a plugin's reader (`type` = its registered name); the reader checks the other keys."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(description="Name of a reader registered by a plugin.")
    name: str = Field(description="Name of the source.")
    train_only: bool = _TRAIN_ONLY


_BUILTIN_SOURCES = {"folder", "csv", "mask_contest", "bundled"}


def _source_kind(value) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if kind is None:
        return None
    return kind if isinstance(kind, str) and kind in _BUILTIN_SOURCES else "plugin"


Source = Annotated[Union[Annotated[FolderSource, Tag("folder")], Annotated[CsvSource, Tag("csv")],
                         Annotated[MaskContestSource, Tag("mask_contest")], Annotated[BundledSource, Tag("bundled")],
                         Annotated[PluginSource, Tag("plugin")]],
                   Discriminator(_source_kind)]


class LabelSpec(_Section):
    """How one column becomes class indices."""

    column: str = Field(description="Column holding the label (a manifest column, or `label` for folder sources).")
    map: dict[str, str] | None = Field(None, description="Rename values before anything else, "
                                                         "e.g. {con_mascarilla: wear}.")
    classes: list[str] | None = Field(None, description="Class names in index order. Default: the sorted values "
                                                        "found in the data (or the bin names).")
    bins: list[float] | None = Field(None, description="Cut points for a numeric column: [30, 60] gives classes "
                                                       "<30, 30-59, 60+ (a value equal to a cut goes up).")

    @field_validator("bins")
    @classmethod
    def _increasing(cls, v):
        if v is not None and (not v or any(b >= a for a, b in zip(v[1:], v[:-1]))):
            raise ValueError("bins must be a non-empty list of strictly increasing cut points, e.g. [30, 60]")
        return v

    @model_validator(mode="after")
    def _bins_or_map(self):
        if self.bins is not None and self.map is not None:
            raise ValueError("use either `bins` (numeric column) or `map` (text column), not both")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must be unique")
        return self


class TargetSpec(LabelSpec):
    """The label the model learns: one column, or `composite` of several (mask x gender x age = 18 classes)."""

    column: str | None = Field(None, description="Column holding the label.")
    composite: dict[str, LabelSpec] | None = Field(
        None, description="Several labels combined into one class: index = sum(index_i * prod(n_j for j > i)), "
                          "e.g. mask*6 + gender*3 + age for 3 x 2 x 3 classes.")

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.column is None) == (self.composite is None):
            raise ValueError("give either `column` or `composite`")
        if self.composite is not None and any(x is not None for x in (self.map, self.classes, self.bins)):
            raise ValueError("`map`, `classes` and `bins` go inside each part of `composite`")
        return self


class DataSection(_Section):
    """Where the images and labels come from."""

    root: str = Field(".", description="Folder that data source paths are relative to; "
                                       "override per machine with --set data.root=/path.")
    sources: list[Source] = Field(min_length=1, description="One or more sources, concatenated.")
    target: TargetSpec | None = Field(None, description="The label to learn (one head). For several heads, use the "
                                                       "top-level `tasks` instead.")
    missing_label: Literal["drop", "error"] = Field(
        "drop", description="Rows without a label: drop them (the count is reported) or stop with an error.")
    bad_images: Literal["error", "skip"] = Field(
        "error", description="Unreadable images: stop naming the file, or skip them (listed in the run folder).")
    cache: Literal["memory", "disk", "none"] = Field(
        "memory", description="Decode and resize each image once and keep the result in memory, or on disk (large "
                              "sets; reused across runs), or decode every time. Augmentations run every epoch.")
    cache_dir: str = Field("~/.cache/recipe/images", description="Folder of the disk cache.")
    cache_max_gb: float = Field(20.0, gt=0, description="Size limit of the disk cache; least recently used "
                                                        "entries go first.")

    @model_validator(mode="after")
    def _unique_names(self):
        names = [s.name for s in self.sources]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"source names must be unique, repeated: {sorted(dup)}")
        return self


# ----------------------------------------------------------------------------------------------- validation
class _SplitOptions(_Section):
    seed: int = Field(0, description="Seed of the split; the same seed gives the same split.")
    stratify: bool | str = Field(True, description="Keep class proportions: true = by the target, a column name "
                                                   "= by that column, false = no stratification.")
    group_by: str | None = Field("group", description="Column whose values never sit on both sides (`group` = "
                                                      "each source's group column); null = every image alone.")


class HoldoutSplit(_SplitOptions):
    """A single train / validation split, e.g. 8:2 or 7:3."""

    type: Literal["holdout"]
    ratio: float = Field(0.2, gt=0, lt=1, description="Share of the data in validation.")


class KFoldSplit(_SplitOptions):
    """k folds (stratified, grouped); `fold` is the validation fold of this run."""

    type: Literal["kfold"]
    k: int = Field(5, ge=2, description="Number of folds.")
    fold: int = Field(0, ge=0, description="Which fold is validation (0 .. k-1).")

    @model_validator(mode="after")
    def _fold_in_range(self):
        if self.fold >= self.k:
            raise ValueError(f"fold must be below k={self.k}")
        return self


class SourceSplit(_Section):
    """A named data source is the validation set (e.g. external data of another ethnicity); the rest trains."""

    type: Literal["source"]
    source: str = Field(description="Name of the source used for validation.")


class FileSplit(_Section):
    """A split CSV with columns `path` and `split` (train / val), e.g. a previous run's split.csv."""

    type: Literal["file"]
    path: str = Field(description="The split CSV (relative to the recipe).")


Validation = Annotated[Union[HoldoutSplit, KFoldSplit, SourceSplit, FileSplit], Field(discriminator="type")]


# ----------------------------------------------------------------------------------------------- transforms
class ResizeSpec(_Section):
    """The deterministic first stage; it runs once per image (then cached) and never randomly."""

    mode: Literal["stretch", "pad", "crop"] = Field(
        "pad", description="stretch: resize to the size exactly; pad: keep the aspect ratio and pad; "
                           "crop: keep the aspect ratio and center-crop.")
    interpolation: Literal["linear", "area", "cubic", "nearest"] = Field("area", description="Resampling filter.")
    face_margin: float | None = Field(
        None, ge=0, le=2, description="Crop each image to its face first: a square of the face box's longer side "
                                      "grown by this share on every side (0.25 = 25%), clipped to the image. Boxes "
                                      "come from the data (`box_columns`), else the face detector (once per image); "
                                      "images without a face are used whole. null = no face crop.")


class NormalizeSpec(_Section):
    mean: tuple[float, float, float] = Field(description="Per-channel mean of 0..1 pixel values.")
    std: tuple[float, float, float] = Field(description="Per-channel standard deviation.")


class TransformsSection(_Section):
    """Resize first, then the ordered training augmentations; evaluation is resize + normalize only."""

    image_size: int | tuple[int, int] | Literal["auto"] = Field(
        "auto", description="Input size: an int, [height, width], or `auto` = the backbone's own default size.")
    resize: ResizeSpec = Field(default_factory=ResizeSpec, description="How the resize stage fits images.")
    train: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Training augmentations in order: `{name: <albumentations transform>, <its arguments>}`; "
                    "`p` defaults as in the transform's constructor.")
    train_file: str | None = Field(None, description="A pipeline saved by albumentations' A.save (YAML/JSON), "
                                                     "used as the training augmentations instead of `train`.")
    normalize: NormalizeSpec | None = Field(None, description="Mean/std; default: the backbone's own.")

    @field_validator("image_size")
    @classmethod
    def _positive(cls, v):
        sizes = (v,) if isinstance(v, int) else (v if isinstance(v, tuple) else ())
        if any(s < 8 for s in sizes):
            raise ValueError("image sizes must be at least 8 pixels")
        return v

    @field_validator("train")
    @classmethod
    def _named(cls, v):
        for i, spec in enumerate(v):
            if not isinstance(spec.get("name"), str):
                raise ValueError(f"item {i} needs `name: <transform>`, e.g. {{name: HorizontalFlip, p: 0.5}}")
        return v

    @model_validator(mode="after")
    def _one_list(self):
        if self.train and self.train_file:
            raise ValueError("give the augmentations either as `train` or as `train_file`, not both")
        return self


# ---------------------------------------------------------------------------------------------------- model
class ModelSection(_Section):
    """The network: a timm backbone with a fresh classification head."""

    backbone: str = Field(description="Any timm model name, e.g. resnet18, efficientnet_b0, test_resnet.")
    pretrained: bool = Field(False, description="Download hub weights (fails fast here: no internet). Prefer "
                                                "`weights` with a local file.")
    weights: str | None = Field(None, description="Local weights: .safetensors, or .pth/.bin/.pt loaded with "
                                                  "weights_only=True; a training checkpoint of this framework works "
                                                  "too. A head that does not match is re-initialised.")
    drop_rate: float = Field(0.0, ge=0, lt=1, description="Dropout before the classifier.")
    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="Stochastic depth, where the backbone has it.")
    args: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for timm.create_model, "
                                                                   "e.g. {output_stride: 16} to keep twice the "
                                                                   "spatial detail in the last stage.")
    channels_last: bool = Field(False, description="Weights and inputs in the channels-last memory format: faster "
                                                   "steps for most CNNs on CPU and GPU (measure yours with "
                                                   "benchmarks/channels_last.py); not bit-identical to the default.")
    compile: bool = Field(False, description="torch.compile the model (faster steps on a GPU after a slow first one).")


# ---------------------------------------------------------------------------------------------------- train
class AdamW(_Section):
    name: Literal["adamw"]
    lr: float = Field(1e-3, gt=0, description="Learning rate.")
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)


class SGD(_Section):
    name: Literal["sgd"]
    lr: float = Field(0.05, gt=0, description="Learning rate.")
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True


Optimizer = Annotated[Union[AdamW, SGD], Field(discriminator="name")]


class Cosine(_Section):
    """Linear warm-up, then cosine decay to `min_lr_ratio * lr`, stepped every optimizer step."""

    name: Literal["cosine"]
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1)


class StepLR(_Section):
    name: Literal["step"]
    every_epochs: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0, le=1)


class Constant(_Section):
    name: Literal["constant"]


Scheduler = Annotated[Union[Cosine, StepLR, Constant], Field(discriminator="name")]


class LossSpec(_Section):
    """Loss and class weighting; the rare 60+ age group is why weights and focal loss exist."""

    name: str = Field(
        "cross_entropy", description="cross_entropy, focal (down-weights easy samples), f1 (a differentiable "
                                     "macro-F1, added to cross-entropy), or a loss registered by a plugin.")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    gamma: float = Field(2.0, ge=0, description="Focal loss focusing parameter.")
    class_weights: Literal["none", "auto"] | list[float] = Field(
        "none", description="none, auto (inverse class frequency of the training split), or one weight per class.")
    args: dict[str, Any] = Field(default_factory=dict, description="Extra options for a plugin loss.")

    @field_validator("name")
    @classmethod
    def _registered(cls, v):
        from framework.registry import LOSSES, RegistryError

        try:
            LOSSES.get(v)
        except RegistryError as e:
            raise ValueError(f"{e} Losses: {', '.join(LOSSES.names())}") from None
        return v


def _default_tag(data, key: str, tag: str, value: str):
    """`--set train.optimizer.lr=0.01` on a recipe without an optimizer means the default one: fill in its tag."""
    if isinstance(data, dict) and isinstance(data.get(key), dict) and tag not in data[key]:
        data = {**data, key: {tag: value, **data[key]}}
    return data


class TrainSection(_Section):
    @model_validator(mode="before")
    @classmethod
    def _default_choices(cls, data):
        return _default_tag(_default_tag(data, "optimizer", "name", "adamw"), "scheduler", "name", "cosine")

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1, description="Per process.")
    optimizer: Optimizer = Field(default_factory=lambda: AdamW(name="adamw"))
    scheduler: Scheduler = Field(default_factory=lambda: Cosine(name="cosine"))
    loss: LossSpec = Field(default_factory=LossSpec)
    sampler: Literal["random", "balanced", "sqrt"] = Field(
        "random", description="balanced: draw classes equally often (with replacement) each epoch; sqrt: draw each "
                              "class in proportion to the square root of its size (rare classes oversampled less).")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Autocast precision on a GPU.")
    grad_accum: int = Field(1, ge=1, description="Optimizer step every N batches.")
    clip_grad_norm: float | None = Field(None, gt=0, description="Clip the gradient norm to this value.")
    mixup: float = Field(0.0, ge=0, description="Mixup: blend each training image (and its loss) with another of "
                                                "the batch by a Beta(a, a) weight; 0 = off, 0.2-0.4 is usual.")
    ema: float | None = Field(None, gt=0, lt=1, description="Keep an exponential moving average of the weights "
                                                           "with this decay per optimizer step (e.g. 0.998); "
                                                           "validation, `best` and predictions use the average.")
    seed: int = Field(0, description="Seed of weights, sampling and augmentation.")
    num_workers: int | Literal["auto"] = Field("auto", description="Loader processes; auto = from the core count.")


class TaskSpec(TargetSpec):
    """One head of a multi-task model: its label, its kind, its loss and its weight in the total loss."""

    kind: Literal["classification", "regression", "ordinal", "anomaly"] = Field(
        "classification", description="classification: one class per band or value; regression: predict the number "
        "(needs `bins`: its bands are the classes of the metrics and predictions, and can be moved after training); "
        "ordinal: 'is it above band k' heads over ordered `bins`; anomaly: the class named in `anomaly` against the "
        "rest, with a threshold chosen on the validation split.")
    anomaly: str | None = Field(None, description="For kind anomaly: the rare class, e.g. '60+'.")
    loss: LossSpec | None = Field(None, description="This task's loss (default: train.loss; for regression "
                                                    "smooth_l1; l1 and mse too).")
    weight: float = Field(1.0, ge=0, description="Weight of this task's loss in the total.")

    @model_validator(mode="after")
    def _kind_needs(self):
        if self.kind in ("regression", "ordinal") and self.bins is None:
            raise ValueError(f"a {self.kind} task needs `bins` (the bands its metrics and predictions use)")
        if self.kind == "anomaly" and not self.anomaly:
            raise ValueError("an anomaly task needs `anomaly: <the rare class>`, e.g. anomaly: '60+'")
        if self.kind != "anomaly" and self.anomaly is not None:
            raise ValueError("`anomaly` is only for kind anomaly")
        if self.composite is not None and self.kind != "classification":
            raise ValueError("a composite label is a classification task")
        return self


class EvalSection(_Section):
    every: int = Field(1, ge=1, description="Validate every N epochs (and always after the last).")
    batch_size: int | None = Field(None, ge=1, description="Default: 2x the training batch size.")
    tta: Literal["hflip"] | None = Field(None, description="hflip: score each image by the average of its outputs "
                                                        "and its mirror image's, in validation (so also when "
                                                        "choosing `best`) and, by default, in predict / evaluate.")


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
