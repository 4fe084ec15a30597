"""The `tune` section: what `recipe tune` searches (a space of recipe values), how (sampler, pruner), for how long,
and where the study is kept so that several processes and machines share it. `recipe run` ignores the section."""
from __future__ import annotations

import builtins
import math
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from framework.recipe.schema.base import _Section


def _check_range(low, high, step, log: bool) -> None:
    if not low < high:
        raise ValueError(f"the range [{low}, {high}] is empty or inverted: write [low, high] with low < high")
    if log and low <= 0:
        raise ValueError(f"log: true needs a range above 0, and {low} is not (log of {low} is undefined)")
    if step is not None and log:
        raise ValueError("give either log: true or a step, not both (Optuna samples one or the other)")
    if step is not None and step > high - low:
        raise ValueError(f"the step {step} is larger than the range {high} - {low}")


class FloatParam(_Section):
    float: tuple[builtins.float, builtins.float] = Field(description="[low, high], both included.")
    log: bool = Field(False, description="Sample on a log scale (both bounds must be above 0).")
    step: builtins.float | None = Field(None, gt=0, description="Only multiples of step above low (e.g. 0.05).")

    @model_validator(mode="after")
    def _range(self):
        _check_range(*self.float, self.step, self.log)
        return self


class IntParam(_Section):
    int: tuple[builtins.int, builtins.int] = Field(description="[low, high], both included.")
    log: bool = Field(False, description="Sample on a log scale (both bounds must be above 0).")
    step: builtins.int | None = Field(None, ge=1, description="Only every step-th value from low.")

    @model_validator(mode="after")
    def _range(self):
        _check_range(*self.int, self.step, self.log)
        return self


class ChoiceParam(_Section):
    choice: list[Any] = Field(min_length=1, description="The values to choose from; each must make a valid recipe.")

    @model_validator(mode="after")
    def _distinct(self):
        texts = [repr(v) for v in self.choice]
        if len(set(texts)) != len(texts):
            raise ValueError("a value is listed twice")
        if any(isinstance(v, float) and not math.isfinite(v) for v in self.choice):
            raise ValueError("inf and nan are not values a recipe takes")
        return self


def _param_kind(value) -> str | None:
    if isinstance(value, dict):
        found = [k for k in ("float", "int", "choice") if k in value]
        return found[0] if found else None
    return {FloatParam: "float", IntParam: "int", ChoiceParam: "choice"}.get(type(value))


Param = Annotated[Union[Annotated[FloatParam, Tag("float")], Annotated[IntParam, Tag("int")],
                        Annotated[ChoiceParam, Tag("choice")]],
                  Discriminator(_param_kind, custom_error_type="parameter_kind",
                                custom_error_message="a parameter is {float: [low, high]}, {int: [low, high]} or "
                                                     "{choice: [values]}")]


class SamplerSpec(_Section):
    name: Literal["tpe", "random", "grid", "cmaes"] = Field(
        "tpe", description="tpe: learns from earlier trials (the default); random; grid: every combination of "
                           "choices and stepped ranges; cmaes: continuous ranges (needs the cmaes package).")
    seed: int | None = Field(0, ge=0, le=2**32 - 1, description="The sampler's seed (null: a new search each time).")


class PrunerSpec(_Section):
    name: Literal["none", "median", "hyperband"] = Field(
        "median", description="median: stop a trial whose metric at a validation is worse than the median of "
                              "earlier trials at the same epoch; hyperband: successive halving; none: never stop.")
    startup_trials: int = Field(5, ge=0, description="median: trials that always run to the end first.")
    warmup_epochs: int = Field(0, ge=0, description="median: epochs of each trial that are never judged.")


class TuneSection(_Section):
    """A hyper-parameter search over this recipe: each trial is an ordinary run with some values changed."""

    space: dict[str, Param] = Field(
        min_length=1, description="Dotted recipe paths to search, e.g. `train.optimizer.lr: {float: [1.0e-4, "
                                  "1.0e-2], log: true}`, `model.backbone: {choice: [resnet18, resnet10t]}`.")
    metric: str | None = Field(None, description="What the trials are judged by: any checkpoint.monitor name "
                                                 "(default: checkpoint.monitor). Each trial keeps its best epoch "
                                                 "by it.")
    direction: Literal["maximize", "minimize"] | None = Field(
        None, description="Default: from checkpoint.mode (max: maximize) when metric is the monitor, else "
                          "minimize for losses and MAE, maximize for the rest.")
    trials: int | None = Field(20, ge=1, le=100000, description="Finished trials the study ends with (pruned "
                                                               "ones count), over all workers.")
    timeout: float | None = Field(None, gt=0, description="Seconds after which this worker starts no new trial.")
    study: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                              description="The study's name; also the trial folders' prefix (default: the recipe "
                                          "file's name).")
    storage: str | None = Field(None, description="Where the study lives: a journal file path (default "
                                                  "`<output.root>/<study>-tune/study.journal`), sqlite:///file.db, "
                                                  "or postgresql://user@host/db for machines with no shared disk.")
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    stale_after: float = Field(300, ge=2, description="Seconds without a heartbeat after which a running trial "
                                                      "counts as dead (its worker was killed): it is marked failed "
                                                      "and tried again, resuming its run folder.")
    retries: int = Field(2, ge=0, le=10, description="How often a killed or interrupted trial is tried again.")
