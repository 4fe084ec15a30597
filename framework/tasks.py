"""Task heads: how each kind of task turns network outputs into a loss, band probabilities and predictions.

Labels travel as one float per task and image: the class index for classification, ordinal and anomaly tasks
(-1 = no label), the number itself for regression (NaN = no label). Every kind predicts a *band* (a class), so
metrics, prediction files and ensembles treat them alike; regression also predicts its number (and MAE is
reported), and its bands are just `bins` applied to that number - move the cut points and re-evaluate, no retraining.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Head:
    """One task: its kind, band names and bins; output size; loss; band probabilities; predictions."""

    def __init__(self, name: str, kind: str, classes: list[str], bins=None, threshold: float = 0.5,
                 pos_weight: float | None = None):
        self.name, self.kind, self.classes = name, kind, list(classes)
        self.bins = None if bins is None else torch.tensor(bins, dtype=torch.float32)
        self.threshold, self.pos_weight = threshold, pos_weight

    @property
    def out_dim(self) -> int:
        return {"classification": len(self.classes), "ordinal": len(self.classes) - 1}.get(self.kind, 1)

    def has(self, col: torch.Tensor) -> torch.Tensor:
        return ~torch.isnan(col) if self.kind == "regression" else col >= 0

    def bands(self, col: torch.Tensor) -> torch.Tensor:
        """True band index per image (-1 where there is no label)."""
        if self.kind != "regression":
            return col.long()
        band = torch.bucketize(col.float().contiguous(), self.bins.to(col.device), right=True)
        return torch.where(torch.isnan(col), torch.full_like(band, -1), band)

    def loss(self, out: torch.Tensor, col: torch.Tensor, fn) -> torch.Tensor:
        has = self.has(col)
        if not has.any():  # keep the head in the graph (data-parallel training expects every parameter used)
            return out.sum() * 0.0
        out, col = out[has], col[has]
        if self.kind == "classification":
            return fn(out, col.long())
        if self.kind == "regression":
            return fn(out[:, 0].float(), col.float())
        if self.kind == "ordinal":  # target k: "is the band above k"
            above = (col[:, None] > torch.arange(self.out_dim, device=col.device)).float()
            return F.binary_cross_entropy_with_logits(out.float(), above)
        weight = None if self.pos_weight is None else torch.tensor(self.pos_weight, device=out.device)
        return F.binary_cross_entropy_with_logits(out[:, 0].float(), col.float(), pos_weight=weight)

    def value(self, out: torch.Tensor) -> torch.Tensor:
        """The predicted number of a regression task (N,)."""
        return out[:, 0].float()

    def score(self, out: torch.Tensor) -> torch.Tensor:
        """The anomaly score (N,) in 0..1."""
        return torch.sigmoid(out[:, 0].float())

    def probs(self, out: torch.Tensor) -> torch.Tensor:
        """Band probabilities (N, C); their argmax is the prediction (the anomaly threshold included)."""
        out = out.float()
        if self.kind == "classification":
            return out.softmax(1)
        if self.kind == "regression":
            band = torch.bucketize(self.value(out).contiguous(), self.bins.to(out.device), right=True)
            return F.one_hot(band, len(self.classes)).float()
        if self.kind == "ordinal":
            above = torch.sigmoid(out)  # P(band > k), k = 0 .. C-2
            ones, zeros = torch.ones_like(above[:, :1]), torch.zeros_like(above[:, :1])
            cum = torch.cat([ones, torch.cummin(above, dim=1).values, zeros], dim=1)  # monotone
            return (cum[:, :-1] - cum[:, 1:]).clamp(min=0)
        t = min(max(self.threshold, 1e-6), 1 - 1e-6)
        s = torch.sigmoid(out[:, 0] - math.log(t / (1 - t)))  # shifted so that 0.5 is the chosen threshold
        return torch.stack([1 - s, s], dim=1)

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        return self.probs(out).argmax(1)


def build_heads(recipe, labels: dict, train_codes: dict | None = None, thresholds: dict | None = None,
                bins_override: dict | None = None) -> dict[str, Head]:
    """A Head per task of the recipe (`labels`: task -> LabelSet, or task -> {"classes": [...]})."""
    heads = {}
    for task, spec in recipe.task_specs().items():
        classes = labels[task].classes if hasattr(labels[task], "classes") else labels[task]["classes"]
        pos_weight = None
        loss = spec.loss or recipe.train.loss
        if spec.kind == "anomaly" and train_codes is not None and loss.class_weights == "auto":
            codes = [c for c in train_codes[task] if c >= 0]
            positives = max(1, sum(codes))
            pos_weight = (len(codes) - positives) / positives
        heads[task] = Head(task, spec.kind, classes, spec.bins, (thresholds or {}).get(task, 0.5), pos_weight)
    return heads


def best_threshold(scores, labels) -> tuple[float, float]:
    """The threshold on anomaly scores with the best F1 of the anomaly class, and that F1."""
    import numpy as np

    scores, labels = np.asarray(scores, float), np.asarray(labels, int)
    if not labels.any():
        return 0.5, 0.0
    order = np.argsort(-scores)
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    fp = np.cumsum(1 - y)
    f1 = 2 * tp / (tp + fp + y.sum())  # predict positive for the top k
    k = int(np.argmax(f1))
    below = s[k + 1] if k + 1 < len(s) else 0.0
    return float((s[k] + below) / 2), float(f1[k])
