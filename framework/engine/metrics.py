"""Epoch-level classification metrics from the confusion matrix (never averages of batch averages)."""
from __future__ import annotations

import numpy as np


def confusion(y_true, y_pred, num_classes: int) -> np.ndarray:
    """cm[t, p] = how many samples of true class t were predicted as p."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def scores(cm: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro-F1 (over classes with support or predictions) and per-class precision/recall/F1."""
    tp = np.diag(cm).astype(float)
    support = cm.sum(1).astype(float)
    predicted = cm.sum(0).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    counted = (support > 0) | (predicted > 0)
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[counted].mean()) if counted.any() else 0.0,
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(classes)},
        "confusion": cm.tolist(),
    }


def format_report(s: dict) -> str:
    """A per-class table for the terminal."""
    name_w = max(8, *(len(c) for c in s["per_class"]))
    lines = [f"{'class':<{name_w}}  precision  recall     f1  support"]
    for c, m in s["per_class"].items():
        lines.append(f"{c:<{name_w}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  {m['support']:7d}")
    return "\n".join(lines)
