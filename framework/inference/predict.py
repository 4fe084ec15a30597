"""Predict images with a trained run (with test-time augmentation), and the prediction CSV every command writes.

Whenever the questions form a composite, the answer also has `composite` and `composite_index` (the LabelSet codec:
mixed radix over the parts, e.g. mask*6 + gender*3 + age). A run that learnt one composite head and one with a head
per question therefore write the same columns, and per-task runs can be ensembled into the composite answer.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from framework.data.labels import LabelSet
from framework.inference.run import LoadedRun, resolve_tta

BATCH = 64


@dataclass
class Predictions:
    """What a run (or an ensemble) says about a list of images."""

    paths: list[str]
    ok: list[int]  # indices into `paths` of the readable images
    probs: dict[str, np.ndarray]  # per task (or question): (len(ok), classes)
    failures: list[tuple[str, str]]  # (path, why) of the unreadable images
    values: dict[str, np.ndarray] = field(default_factory=dict)  # regression tasks: the predicted number (len(ok),)
    truth: dict[str, list[str]] = field(default_factory=dict)  # evaluate: each question's true class (len(ok),)
    marginal: tuple = ()  # questions whose probabilities are a composite head's marginals (not what chose them)

    def subset(self, ok: list[int]) -> "Predictions":
        """The same predictions for the images `ok` (each in self.ok): members of an ensemble aligned."""
        rows = [self.ok.index(i) for i in ok]
        return Predictions(self.paths, list(ok), {q: p[rows] for q, p in self.probs.items()}, self.failures,
                           {q: v[rows] for q, v in self.values.items()})


def predict_tasks(run: LoadedRun, paths: list[str], tta: str | None = None, boxes: list | None = None,
                  progress: bool = False) -> Predictions:
    """Per task head, probabilities (N_ok, classes) for the readable images, and each regression task's number.
    `boxes` (one face box or None per image) feed a face-cropping resize stage; images without one get the face
    detector's box. `tta` None means the run's own `eval.tta` (what its validation figures were measured with);
    "none" turns it off."""
    tta = resolve_tta(run, tta)
    images, ok, failures = prepared(run, paths, boxes, progress)
    raw: dict[str, list] = {}
    values: dict[str, list] = {}
    for start in range(0, len(ok), BATCH):
        batch = np.stack([np.ascontiguousarray(images[i]).transpose(2, 0, 1) for i in ok[start:start + BATCH]])
        for t, (p, v) in run.forward(batch, tta).items():  # (N, 3, H, W) uint8 in
            raw.setdefault(t, []).append(p)
            if v is not None:
                values.setdefault(t, []).append(v)
    probs = {t: np.concatenate(raw[t]) if raw.get(t) else np.zeros((0, len(lab.classes)))
             for t, lab in run.labels.items()}
    return Predictions(list(paths), ok, probs, [(paths[i], why) for i, why in failures],
                       {t: np.concatenate(v) for t, v in values.items()})


def prepared(run: LoadedRun, paths: list[str], boxes: list | None = None, progress: bool = False):
    """The images through the run's resize stage (face-cropped by `boxes`, else detected, when the run crops to
    faces): (images, indices of the readable ones, [(index, why) of the others])."""
    from framework.data.dataset import prepare

    rows = [{"path": p, "box": boxes[i] if boxes else None} for i, p in enumerate(paths)]
    detector = None
    if run.recipe.transforms.resize.face_margin is not None and not (boxes and all(boxes)):
        detector = run_detector(run)
    images, _, failures = prepare(rows, run.resize, progress="decode" if progress else None, detector=detector)
    bad = {i for i, _ in failures}
    return images, [i for i in range(len(paths)) if i not in bad], failures


def run_detector(run: LoadedRun):
    """The face detector a face-cropping run was trained with (its recipe names it), or a RunError with the fix."""
    from framework.data import faces
    from framework.errors import Issue, RunError

    spec = run.recipe.transforms.face_detector
    missing = faces.missing_package(spec.name)
    if missing:
        raise RunError(Issue(f"this run crops to faces found by a detector: {missing[0]}", field="face_detector",
                             fix=missing[1]))
    return faces.for_recipe(run.recipe)


def predict_proba(run: LoadedRun, paths: list[str], tta: str | None = None, boxes: list | None = None,
                  progress: bool = False) -> Predictions:
    """`predict_tasks`, per question: a composite head's probabilities become its parts' marginals."""
    pred = predict_tasks(run, paths, tta, boxes, progress)
    pred.probs = questions_of(run, pred.probs)
    return pred


def marginal_questions(run: LoadedRun) -> tuple:
    """The questions answered by a composite head: their written probabilities are marginals of the joint, while
    their class is the joint choice's part (the two can disagree)."""
    return tuple(q for lab in run.labels.values() for q in (lab.parts or {}))


def questions_of(run: LoadedRun, task_probs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Task probabilities -> question probabilities (a composite head is split into its parts' marginals)."""
    out = {}
    for task, p in task_probs.items():
        lab = run.labels[task]
        out.update(lab.marginals(p) if lab.parts else {task: p})
    return out


def question_picks(run: LoadedRun, task_picks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each question's class from each task's pick: a composite head's joint choice is split into its parts (the
    same answer its metrics score), other tasks are their own question."""
    out = {}
    for task, codes in task_picks.items():
        lab = run.labels[task]
        out.update(lab.decode(codes) if lab.parts else {task: codes})
    return out


def composite_of(order: list[str], classes: dict[str, list[str]]) -> LabelSet:
    """The composite label set of these questions, in this order."""
    return LabelSet.composite({q: classes[q] for q in order})


def write_predictions(out: Path, pred: Predictions, classes: dict[str, list[str]], order: list[str] | None,
                      with_proba: bool = False, picks: dict[str, np.ndarray] | None = None) -> None:
    """The prediction CSV: path, one column per question, composite and composite_index, the number of each
    regression question (`<question>_value`), each question's true class when known (`<question>_true`, from
    evaluate; empty where the image has none), optional probabilities: `<question>:<class>`, or for the questions of
    a composite head `marginal:<question>:<class>` (the answer is the joint choice, whose parts need not be each
    marginal's argmax)."""
    probs, values = pred.probs, pred.values
    picks = picks or {q: p.argmax(1) for q, p in probs.items()}
    header = ["path"] + list(probs)
    if order:
        header += ["composite", "composite_index"]
        composite = composite_of(order, classes)
        comp = composite.encode([picks[q] for q in order])
    header += [f"{q}_value" for q in values] + [f"{q}_true" for q in pred.truth]
    if with_proba:
        header += [f"{'marginal:' if q in pred.marginal else ''}{q}:{c}" for q in probs for c in classes[q]]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for k, i in enumerate(pred.ok):
            row = [pred.paths[i]] + [classes[q][picks[q][k]] for q in probs]
            if order:
                row += [composite.classes[int(comp[k])], int(comp[k])]
            row += [f"{values[q][k]:.3f}" for q in values] + [pred.truth[q][k] for q in pred.truth]
            if with_proba:
                row += [f"{v:.6f}" for q in probs for v in probs[q][k]]
            w.writerow(row)


def write_failures(path: Path, failures: list[tuple[str, str]]) -> None:
    from framework.io import write_csv

    write_csv(path, ["path", "reason"], failures)
