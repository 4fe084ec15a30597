"""The losses a recipe can name: cross-entropy (label smoothing), focal, a soft macro-F1 term for imbalanced
classes, and l1 / smooth_l1 / mse for numbers.

Each loss is registered with what it takes (`args`: a pydantic model, checked at `validate`; the recipe's flat
`label_smoothing` and `gamma` are shorthands for the same keys) and what it learns (`learns`: `class` indices or
`number`s), so a task kind takes any loss of its target, a plugin's included. Factories share one signature, the
one plugins register too: `(spec, num_classes, weight) -> nn.Module`; `spec.options()` is the checked args model.
The torch modules live in `framework.loss_modules`: importing this module imports no torch.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from framework.registry import LOSSES

TARGETS = ("class", "number")


class NoArgs(BaseModel):
    """A loss that takes nothing."""

    model_config = ConfigDict(extra="forbid")


class SmoothingArgs(NoArgs):
    """Losses over class indices that soften their targets."""

    label_smoothing: float = Field(0.0, ge=0, lt=1, description="The weight moved from the true class to the rest.")


class FocalArgs(SmoothingArgs):
    gamma: float = Field(2.0, ge=0, description="Focusing: easy images count (1 - p_true)^gamma as much.")


class SmoothL1Args(NoArgs):
    beta: float = Field(5.0, gt=0, description="Quadratic below this error, linear above (ages: 5 years).")


def target_of(name: str) -> str:
    """What the loss `name` learns: `class` (the default of a registration) or `number`."""
    return LOSSES.get(name).meta.get("learns", "class")


def names_for(target: str) -> list[str]:
    return [e.name for e in LOSSES.entries() if e.meta.get("learns", "class") == target]


@LOSSES.register("cross_entropy", args=SmoothingArgs, learns="class")
def cross_entropy(spec, num_classes: int, weight):
    from torch import nn

    return nn.CrossEntropyLoss(weight=weight, label_smoothing=spec.options().label_smoothing)


@LOSSES.register("focal", args=FocalArgs, learns="class")
def focal(spec, num_classes: int, weight):
    from framework.loss_modules import FocalLoss

    options = spec.options()
    return FocalLoss(options.gamma, weight, options.label_smoothing)


@LOSSES.register("f1", args=SmoothingArgs, learns="class")
def f1(spec, num_classes: int, weight):
    from framework.loss_modules import SoftF1Loss

    return SoftF1Loss(num_classes, weight, spec.options().label_smoothing)


@LOSSES.register("l1", args=NoArgs, learns="number")
def l1(spec, num_classes: int, weight):
    from torch import nn

    return nn.L1Loss()


@LOSSES.register("smooth_l1", args=SmoothL1Args, learns="number")
def smooth_l1(spec, num_classes: int, weight):
    from torch import nn

    return nn.SmoothL1Loss(beta=spec.options().beta)


@LOSSES.register("mse", args=NoArgs, learns="number")
def mse(spec, num_classes: int, weight):
    from torch import nn

    return nn.MSELoss()


def build_loss(spec, num_classes: int, train_labels: list[int]):
    """The loss named in the recipe (built-in or registered by a plugin), with its class weights."""
    from framework.loss_modules import class_weights

    weight = class_weights(spec.class_weights, train_labels, num_classes)
    return LOSSES.get(spec.name).load()(spec, num_classes, weight)
