"""Epoch-level metrics from the confusion matrix (never averages of batch averages); no torch."""
from __future__ import annotations

import numpy as np


def confusion(y_true, y_pred, num_classes: int) -> np.ndarray:
    """cm[t, p] = how many samples of true class t were predicted as p."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def scores(cm: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro-F1 (over the classes present in the data; `absent` names the others) and per-class
    precision/recall/F1."""
    tp = np.diag(cm).astype(float)
    support = cm.sum(1).astype(float)
    predicted = cm.sum(0).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    counted = support > 0  # a class absent from the data is left out of the mean, as scikit-learn's labels= does;
    total = cm.sum()       # predictions of it still cost the true classes their recall
    out = {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[counted].mean()) if counted.any() else 0.0,
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(classes)},
        "confusion": cm.tolist(),
    }
    absent = [c for i, c in enumerate(classes) if support[i] == 0]
    return out | ({"absent": absent} if absent and total else {})


def format_report(s: dict) -> str:
    """A per-class table for the terminal."""
    name_w = max(8, *(len(c) for c in s["per_class"]))
    lines = [f"{'class':<{name_w}}  precision  recall     f1  support"]
    for c, m in s["per_class"].items():
        lines.append(f"{c:<{name_w}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  {m['support']:7d}")
    if s.get("absent"):
        lines.append(f"warning: {', '.join(s['absent'])} never occur in this data, so macro-F1 is the mean over the "
                     f"other {len(s['per_class']) - len(s['absent'])} classes (predictions of them still count as "
                     "errors)")
    return "\n".join(lines)


def task_scores(record: dict, name: str = "") -> dict[str, dict]:
    """A metrics record's scores by task: a multi-task record lists them under "tasks"; a single-task record is its
    one task's scores (named `name`, "" by default). The one place that knows both shapes."""
    return dict(record["tasks"]) if "tasks" in record else {name: record}


def per_task(val: dict) -> dict[str, dict]:
    """A validation record's scores by task name ("" for a single-task run), then a composite head's questions
    (mask, gender, age: scored from its joint choice)."""
    tasks = task_scores(val)
    return tasks | {q: sc for t in list(tasks.values()) for q, sc in t.get("questions", {}).items()}


def summarize(y_true: np.ndarray, y_pred: np.ndarray, labels: dict, loss: float | None = None,
              extras: dict | None = None) -> dict:
    """Scores of every task on the samples labelled for it; with several tasks, their mean and the composite
    label over the samples that have every task (its index: the tasks' LabelSet codec, e.g. mask*6 + gender*3 + age).

    y_true, y_pred: (N, T) class indices, -1 in y_true where a sample has no label for that task."""
    from framework.data.labels import LabelSet

    per = {}
    for j, (task, lab) in enumerate(labels.items()):
        has = y_true[:, j] >= 0
        if len(labels) > 1 and not has.any():
            continue  # a task this data has no labels for is not scored (nor averaged in as 0)
        per[task] = scores(confusion(y_true[has, j], y_pred[has, j], len(lab.classes)), lab.classes)
        per[task].update((extras or {}).get(task, {}))  # a regression task's MAE, an anomaly task's threshold
        if lab.parts:  # a composite head (mask x gender x age): each question scored from the same joint choice
            truth, chosen = lab.decode(y_true[has, j]), lab.decode(y_pred[has, j])
            per[task]["questions"] = {q: scores(confusion(truth[q], chosen[q], len(c)), c) for q, c in lab.parts.items()}
    if len(labels) == 1:
        out = dict(next(iter(per.values())))
    else:
        out = {"accuracy": float(np.mean([p["accuracy"] for p in per.values()])) if per else 0.0,
               "macro_f1": float(np.mean([p["macro_f1"] for p in per.values()])) if per else 0.0, "tasks": per}
        full = (y_true >= 0).all(1)
        if full.any():
            combined = LabelSet.composite({t: lab.classes for t, lab in labels.items()})
            codes_true = combined.encode([y_true[full, j] for j in range(len(labels))])
            codes_pred = combined.encode([y_pred[full, j] for j in range(len(labels))])
            out["composite"] = scores(confusion(codes_true, codes_pred, len(combined.classes)), combined.classes)
    if loss is not None:
        out["loss"] = loss
    return out


def flat_metrics(record: dict) -> dict:
    """Scalar metrics of a metrics.jsonl record by name: `val/macro_f1`, and per task `val/mask/macro_f1`,
    `val/composite/accuracy` (the names `checkpoint.monitor`, compare and ensembles use)."""
    out = {"lr": record["lr"]} | ({"lr_backbone": record["lr_backbone"]} if "lr_backbone" in record else {})
    for side in ("train", "val"):
        if side not in record:
            continue
        r = record[side]
        for k in ("loss", "accuracy", "macro_f1", "images_per_sec", "mae", "threshold"):
            if k in r:
                out[f"{side}/{k}"] = r[k]
        parts = dict(r.get("tasks", {}))
        for sc in [r, *r.get("tasks", {}).values()]:  # a composite head's questions: val/mask/macro_f1 ...
            parts |= sc.get("questions", {})
        if "composite" in r:
            parts["composite"] = r["composite"]
        elif "questions" in r:  # one composite head: its own figures are the composite's (the contest's column)
            parts["composite"] = r
        for task, sc in parts.items():
            for k in ("accuracy", "macro_f1", "mae", "threshold"):
                if k in sc:
                    out[f"{side}/{task}/{k}"] = sc[k]
        for name, sc in r.get("sources", {}).items():  # val/source/<name>/macro_f1 ...
            out[f"{side}/source/{name}/macro_f1"] = sc["macro_f1"]
            out[f"{side}/source/{name}/accuracy"] = sc["accuracy"]
    return out


def by_source(y_true: np.ndarray, y_pred: np.ndarray, sources: list[str], labels: dict) -> dict:
    """Per data source of the validated items (when there are several): images, accuracy, macro-F1 and each
    class's F1 (per task when there are several tasks): the score on a user's own source is the one that counts."""
    names = np.array(sources)
    if len(set(sources)) < 2:
        return {}
    out = {}
    for name in sorted(set(sources)):
        mine = names == name
        s = summarize(y_true[mine], y_pred[mine], labels)
        parts = s.get("tasks", {"": s})
        out[name] = {"images": int(mine.sum()), "accuracy": s["accuracy"], "macro_f1": s["macro_f1"],
                     "class_f1": {f"{t}:{c}" if t else c: round(m["f1"], 4) for t, sc in parts.items()
                                  for c, m in sc["per_class"].items() if m["support"]}}
    return out


def band_means(values, bins, n: int) -> np.ndarray | None:
    """Each of the `n` bands' mean value (bands: `bins` cut points, as the heads cut them), or None when a band has
    no value: what an ordinal or banded class prediction's expected value is made of."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    band = np.searchsorted(np.asarray(bins), values, side="right")
    if not all((band == k).any() for k in range(n)):
        return None
    return np.array([values[band == k].mean() for k in range(n)])


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> float:
    """Macro-F1 over `n` classes of the samples that have a label (y_true >= 0)."""
    has = y_true >= 0
    return scores(confusion(y_true[has], y_pred[has], n), [str(i) for i in range(n)])["macro_f1"]
