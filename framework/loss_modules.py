"""The loss modules (torch): class weights, focal loss, a soft macro-F1 term, and the multi-task sum. Which loss a
recipe names, and what it takes, is `framework.losses` (no torch there, so `recipe validate` needs none)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from framework.errors import FieldError


def class_weights(spec, train_labels: list[int], num_classes: int) -> torch.Tensor | None:
    """None, inverse-frequency weights (`auto`, mean 1 over present classes), or the recipe's list."""
    if spec == "none":
        return None
    if spec == "auto":
        counts = torch.bincount(torch.tensor(train_labels), minlength=num_classes).float()
        w = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
        return w
    if len(spec) != num_classes:
        raise FieldError(("train", "loss", "class_weights"), f"{len(spec)} weights for {num_classes} classes.",
                         "give one weight per class, in class order, or use auto.")
    return torch.tensor(spec, dtype=torch.float32)


class FocalLoss(nn.Module):
    """Cross-entropy scaled by (1 - p_true)^gamma: easy samples count less, rare hard ones more."""

    def __init__(self, gamma: float, weight=None, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits, target):
        ce = F.cross_entropy(logits, target, reduction="none", label_smoothing=self.label_smoothing)
        p_true = torch.exp(-F.cross_entropy(logits, target, reduction="none"))  # (N,)
        loss = (1 - p_true) ** self.gamma * ce
        if self.weight is not None:
            w = self.weight[target]
            return (loss * w).sum() / w.sum().clamp(min=1e-12)
        return loss.mean()


class SoftF1Loss(nn.Module):
    """Cross-entropy plus (1 - soft macro-F1) of the batch: pushes recall of rare classes up."""

    def __init__(self, num_classes: int, weight=None, label_smoothing: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.ce = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)

    def forward(self, logits, target):
        p = logits.float().softmax(dim=1)  # (N, C)
        onehot = F.one_hot(target, self.num_classes).float()  # (N, C)
        tp = (p * onehot).sum(0)
        precision_denom = p.sum(0)
        recall_denom = onehot.sum(0)
        f1 = 2 * tp / (precision_denom + recall_denom).clamp(min=1e-6)  # (C,)
        present = recall_denom > 0
        return self.ce(logits, target) + (1 - f1[present].mean())


class MultiTaskLoss(nn.Module):
    """Weighted sum of each task's loss over the images that have that task's label (see framework.tasks)."""

    def __init__(self, heads: dict, losses: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        self.heads = heads
        self.losses = nn.ModuleDict(losses)
        self.weights = dict(weights)

    def forward(self, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for j, (task, head) in enumerate(self.heads.items()):  # labels: (N, T), one column per task
            total = total + self.weights[task] * head.loss(logits[task], labels[:, j], self.losses[task])
        return total
