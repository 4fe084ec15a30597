"""Every registered built-in works through the one look-up path its registry offers: adding a loss, a task kind or a
reader adds a case here without writing a test."""
from __future__ import annotations

import pytest
import torch

from framework.recipe.schema import LossSpec, TaskSpec
from framework.registry import LOSSES, READERS, REGISTRIES, TASK_KINDS, WEIGHTS, RegistryError

BUILTIN_LOSSES = [e.name for e in LOSSES.entries() if e.origin == "built-in"]
BUILTIN_KINDS = [e.name for e in TASK_KINDS.entries() if e.origin == "built-in"]


def test_the_built_ins_are_registered_where_they_are_defined():
    assert set(BUILTIN_LOSSES) >= {"cross_entropy", "focal", "f1", "l1", "smooth_l1", "mse"}
    assert set(BUILTIN_KINDS) == {"classification", "regression", "ordinal", "anomaly", "one_class"}
    assert {e.name for e in READERS.entries()} >= {"folder", "csv", "mask_contest", "bundled"}
    assert {e.name for e in WEIGHTS.entries()} >= {"imagenet"}
    for reg in (LOSSES, TASK_KINDS, READERS, WEIGHTS):
        for entry in reg.entries():
            assert not isinstance(entry.target, str)  # the object itself, registered by its decorator


@pytest.mark.parametrize("name", BUILTIN_LOSSES)
def test_every_loss_builds_from_its_spec_and_gives_a_finite_scalar(name):
    from framework.losses import build_loss, target_of

    loss = build_loss(LossSpec(name=name), 3, [0, 1, 2, 2])
    torch.manual_seed(0)
    if target_of(name) == "number":
        value = loss(torch.randn(5), torch.randn(5) * 10)
    else:
        value = loss(torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 1]))
    assert value.ndim == 0 and torch.isfinite(value)


def test_a_loss_checks_its_own_args():
    assert LossSpec(name="smooth_l1", args={"beta": 2.0}).args == {"beta": 2.0}
    with pytest.raises(ValueError, match="beta"):
        LossSpec(name="smooth_l1", args={"beta": -1})
    with pytest.raises(ValueError, match="takes no 'args.alpha'"):
        LossSpec(name="focal", args={"alpha": 0.25})
    with pytest.raises(ValueError, match="loss 'cross_entropy' takes no 'gamma' .it takes: label_smoothing."):
        LossSpec(name="cross_entropy", gamma=3.0)  # it used to be ignored without a word
    with pytest.raises(ValueError, match="takes no 'label_smoothing'"):
        LossSpec(name="smooth_l1", label_smoothing=0.1)
    assert LossSpec(name="focal", gamma=3.0).options().gamma == 3.0
    assert LossSpec(name="focal", args={"gamma": 1.5}).options().gamma == 1.5  # the long form
    assert LossSpec(name="cross_entropy", gamma=2.0).options().label_smoothing == 0.0  # the default: a no-op


@pytest.mark.parametrize("kind", BUILTIN_KINDS)
def test_every_task_kind_gives_a_loss_bands_and_probabilities(kind):
    from framework.tasks import head_class

    cls = head_class(kind)
    rare = kind in ("anomaly", "one_class")  # the rare class against the rest
    spec = {"column": "age", "kind": kind, "bins": [30, 60]} | ({"anomaly": "60+"} if rare else {})
    assert TaskSpec.model_validate(spec).kind == kind  # its registered args model takes what it needs
    classes = ["not 60+", "60+"] if rare else ["<30", "30-59", "60+"]
    head = cls("age", classes, [30, 60])
    out = torch.randn(4, head.out_dim)
    labels = torch.tensor([25.0, 45.0, float("nan"), 70.0]) if head.learns == "number" else torch.tensor([0.0, 1.0, -1.0, 1.0])
    loss = head.loss(out, labels, torch.nn.SmoothL1Loss() if head.learns == "number" else torch.nn.CrossEntropyLoss())
    assert torch.isfinite(loss)
    probs = head.probs(out)
    assert probs.shape == (4, len(classes)) and torch.allclose(probs.sum(1), torch.ones(4), atol=1e-5)
    assert head.bands(labels).tolist()[2] == -1  # no label stays no label


def test_a_kind_says_what_its_spec_lacks():
    with pytest.raises(ValueError, match="task kind 'ordinal' needs 'bins': the cut points"):
        TaskSpec.model_validate({"column": "age", "kind": "ordinal"})
    with pytest.raises(ValueError, match="task kind 'anomaly' needs 'anomaly': the rare class"):
        TaskSpec.model_validate({"column": "age", "kind": "anomaly", "bins": [60]})
    with pytest.raises(ValueError, match="task kind 'anomaly' takes no 'composite'"):
        TaskSpec.model_validate({"kind": "anomaly", "anomaly": "60+",
                                 "composite": {"mask": {"column": "mask"}, "age": {"column": "age"}}})
    with pytest.raises(ValueError, match="task kind 'regression' takes no 'anomaly'"):
        TaskSpec.model_validate({"column": "age", "kind": "regression", "bins": [30], "anomaly": "60+"})
    with pytest.raises(ValueError, match="Did you mean 'regression'"):
        TaskSpec.model_validate({"column": "age", "kind": "regresion", "bins": [30]})


@pytest.mark.parametrize("kind", list(REGISTRIES))
def test_every_registry_names_near_misses(kind):
    reg = REGISTRIES[kind]
    names = reg.names()
    if not names:  # transforms and backbones are empty until a plugin registers one
        with pytest.raises(RegistryError, match=f"unknown {reg.kind} 'nothing'"):
            reg.get("nothing")
        return
    with pytest.raises(RegistryError, match="Did you mean"):
        reg.get(names[0] + "x")


def test_a_plugin_loss_serves_the_heads_of_the_target_it_declares():
    """What a loss learns is its registration's `learns` (class indices by default), not a list of names: a plugin
    loss for numbers trains a regression head, and a class head refuses it with the losses it can take."""
    from pydantic import BaseModel, ConfigDict

    from framework.errors import FieldError
    from framework.tasks import head_class

    class HuberArgs(BaseModel):
        model_config = ConfigDict(extra="forbid")
        delta: float = 1.0

    @LOSSES.register("plugin_huber", args=HuberArgs, learns="number")
    def huber(spec, num_classes, weight):
        return torch.nn.HuberLoss(delta=spec.options().delta)

    try:
        loss = LossSpec(name="plugin_huber", args={"delta": 3.0})
        age = TaskSpec(column="age", bins=[30, 60], kind="regression", loss=loss)
        assert head_class("regression").loss_spec(age, LossSpec()) is loss
        band = TaskSpec(column="age", bins=[30, 60], loss=loss)
        with pytest.raises(FieldError, match="'plugin_huber' learns number targets") as refused:
            head_class("classification").loss_spec(band, LossSpec())
        assert refused.value.items[0][2] == "use one of: cross_entropy, f1, focal."  # the fix names them
        with pytest.raises(ValueError, match="takes no 'args.beta'"):
            LossSpec(name="plugin_huber", args={"beta": 1})
        # train.loss for classes gives way to the regression kind's default; a number loss is no class default
        assert head_class("regression").loss_spec(TaskSpec(column="age", bins=[30], kind="regression"),
                                                   LossSpec(label_smoothing=0.1)).name == "smooth_l1"
    finally:
        LOSSES.unregister("plugin_huber")
    with pytest.raises(ValueError, match="learns='class' or learns='number'"):
        LOSSES.register("plugin_odd", learns="numbers")(huber)
        try:
            LossSpec(name="plugin_odd")
        finally:
            LOSSES.unregister("plugin_odd")
