"""Task kinds: how each kind of head turns network outputs into a loss, band probabilities and predictions.

Labels travel as one float per task and image: the class index for classification, ordinal and anomaly tasks
(-1 = no label), the number itself for regression (NaN = no label). Every kind predicts a *band* (a class), so
metrics, prediction files and ensembles treat them alike; regression also predicts its number (and MAE is
reported), and its bands are just `bins` applied to that number - move the cut points and re-evaluate, no retraining.

A kind is a class registered in `TASK_KINDS` where it is defined; everything that differs between kinds lives in
its class (no `kind == ...` branches elsewhere). A plugin adds a kind the same way.
"""
from __future__ import annotations

import numpy as np

from framework.registry import TASK_KINDS
from framework.tasks.head import Head
from framework.tasks.kinds import best_threshold

__all__ = ["Head", "best_threshold", "build_heads", "head_class", "head_states", "load_head_states",
           "standardize_targets"]


def standardize_targets(heads: dict, train_labels: list) -> None:
    """Each head fits what it learns from its training labels before training (`Head.fit_targets`; a regression
    head: the mean and spread its number is standardised by). `train_labels`: one label vector per training image,
    in task order (NaN or -1 = no label)."""
    for j, head in enumerate(heads.values()):
        head.fit_targets(np.array([float(y[j]) for y in train_labels], dtype=float))


def head_states(heads: dict) -> dict[str, dict]:
    """Task -> what its head learnt outside the weights (`Head.state`), for a checkpoint's `head_state`."""
    return {task: state for task, head in heads.items() if (state := head.state())}


def load_head_states(heads: dict, checkpoint: dict) -> None:
    """Put each head's state back from a checkpoint; also from checkpoints written before heads kept their own
    (a `thresholds` key for anomaly heads, `targets` for regression heads' scaling)."""
    states: dict[str, dict] = {}
    for task, threshold in (checkpoint.get("thresholds") or {}).items():
        states.setdefault(task, {})["threshold"] = threshold
    for task, (center, scale) in (checkpoint.get("targets") or {}).items():
        states.setdefault(task, {}).update(center=center, scale=scale)
    for task, state in (checkpoint.get("head_state") or {}).items():
        states.setdefault(task, {}).update(state)
    for task, state in states.items():
        if task in heads:
            heads[task].load_state(state)


def head_class(kind: str) -> type[Head]:
    return TASK_KINDS.get(kind).load()


def build_heads(recipe, labels: dict, train_codes: dict | None = None) -> dict[str, Head]:
    """A Head per task of the recipe (`labels`: task -> LabelSet, or task -> {"classes": [...]})."""
    heads = {}
    for task, spec in recipe.task_specs().items():
        classes = labels[task].classes if hasattr(labels[task], "classes") else labels[task]["classes"]
        loss = spec.loss or recipe.train.loss
        cls = head_class(spec.kind)
        pos_weight = None if train_codes is None else cls.positive_weight(train_codes[task], loss.class_weights)
        heads[task] = cls(task, classes, spec.bins, 0.5, pos_weight)
    return heads
