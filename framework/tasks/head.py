"""The task head's interface: what every task kind decides for itself (its output size, loss, bands,
probabilities, what it learns outside gradients and saves). The kinds are in `framework.tasks.kinds`."""
from __future__ import annotations

import numpy as np

from framework.errors import FieldError
from framework.libs import lazy

torch = lazy("torch")  # imported when a head computes, not for `validate`


class Head:
    """One task of the classification kind: one output per class, softmax probabilities, cross-entropy-like loss.
    The other kinds subclass it and change what differs."""

    kind = "classification"
    class_offsets = False  # the macro-F1 decision rule (per-class offsets on the log-probabilities) applies

    def __init__(self, name: str, classes: list[str], bins=None, threshold: float = 0.5,
                 pos_weight: float | None = None):
        self.name, self.classes = name, list(classes)
        self.bins = None if bins is None else torch.tensor(bins, dtype=torch.float32)
        self.threshold, self.pos_weight = threshold, pos_weight

    # ---- the recipe side
    learns = "class"  # what its loss learns: class indices, or a number (a loss registers the target it serves)
    default_loss: str | None = None  # the loss it trains with when train.loss serves another target

    @classmethod
    def loss_spec(cls, spec, default):
        """The loss spec this task trains with: its own, else train.loss; a loss must serve this kind's target
        (its registration's `learns`), else train.loss gives way to the kind's default loss."""
        from framework.losses import names_for, target_of

        loss = spec.loss or default
        if target_of(loss.name) == cls.learns:
            return loss
        if spec.loss is None and cls.default_loss:
            return type(loss)(name=cls.default_loss, class_weights="none")
        where = ("tasks", "loss", "name") if spec.loss is not None else ("train", "loss", "name")
        raise FieldError(where, f"{loss.name!r} learns {target_of(loss.name)} targets, but a {cls.kind} task "
                         f"learns {cls.learns} targets.", f"use one of: {', '.join(names_for(cls.learns))}.")

    @classmethod
    def label_codes(cls, codes: list[int], labels, spec, where: tuple):
        """Class indices (-1 = no label) and the label set as this kind learns them (anomaly: 1 for the rare class,
        0 for the rest)."""
        return codes, labels

    @classmethod
    def positive_weight(cls, train_codes: list[int], class_weights: str) -> float | None:
        """The weight of the positive class in a binary loss, from the training split's labels (None: no weight)."""
        return None

    def fit_targets(self, values) -> None:
        """Fit what it learns from its training labels before training (values: numpy, NaN or -1 = no label)."""

    @classmethod
    def reading_spec(cls, spec, labels):
        """The label spec that reads new labelled data (`recipe evaluate`) into a trained run's classes `labels`,
        which may differ from the recipe's (bands moved after training)."""
        if spec.composite:
            parts = {p: s.model_copy(update={"classes": labels.parts[p]}) for p, s in spec.composite.items()}
            return spec.model_copy(update={"composite": parts})
        return spec.model_copy(update={"classes": labels.classes})

    # ---- the model side
    @property
    def out_dim(self) -> int:
        return len(self.classes)

    def has(self, col: torch.Tensor) -> torch.Tensor:
        return col >= 0

    def bands(self, col: torch.Tensor) -> torch.Tensor:
        """True band index per image (-1 where there is no label)."""
        return col.long()

    def loss(self, out: torch.Tensor, col: torch.Tensor, fn) -> torch.Tensor:
        """The task's loss over the images that have its label (`fn`: the built loss module)."""
        has = self.has(col)
        if not has.any():  # keep the head in the graph (data-parallel training expects every parameter used)
            return out.sum() * 0.0
        return self._loss(out[has], col[has], fn)

    def _loss(self, out, col, fn):
        return fn(out, col.long())

    def eval_loss(self) -> torch.nn.Module:
        """The validation loss, summed over images (the same for every loss the task may train with)."""
        return torch.nn.CrossEntropyLoss(reduction="sum")

    def summed_loss(self, out: torch.Tensor, col: torch.Tensor) -> float:
        """Validation loss of a batch, summed over the images that have the label."""
        return float(self.loss(out, col, self.eval_loss()))

    def probs(self, out: torch.Tensor) -> torch.Tensor:
        """Band probabilities (N, C); their argmax is the prediction."""
        return out.float().softmax(1)

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        return self.probs(out).argmax(1)

    def extra_outputs(self, out: torch.Tensor, col: torch.Tensor) -> torch.Tensor | None:
        """What validation keeps besides probabilities (anomaly scores; predicted and true numbers), or None."""
        return None

    def value(self, out: torch.Tensor) -> torch.Tensor | None:
        """The number it predicts (N,), in the data's units; None for a head that predicts bands only."""
        return None

    def estimate(self, probs: np.ndarray, value: np.ndarray | None, band_means):
        """Its estimate (N,) of the number its bands were cut from (for the MAE beside a regression run's), and how
        it is made; None when it makes none. A class head's: the expected value, each band's probability times
        the band's mean training value (`band_means()`: those means, or None when the training rows lack them)."""
        means = band_means()
        if means is None:
            return None
        return probs @ means, "expected value: band probabilities x each band's mean training value"

    def before_validation(self, training_outputs) -> None:
        """Fit what the head learns outside gradients, before each validation. `training_outputs(task)` gives the
        outputs (N, out_dim) and labels (N,) of the training images seen as validation sees them (computed once,
        on first call, for every head that asks). Most heads fit nothing."""

    def after_validation(self, extra: np.ndarray | None, y_true: np.ndarray, y_pred: np.ndarray) -> dict:
        """Metrics of this kind beyond the bands' (MAE, the chosen threshold); may redo `y_pred` in place."""
        return {}

    @classmethod
    def classes_after_training(cls, spec):
        """Its classes (a LabelSet) when a trained run is loaded with `spec`, for a kind whose bands follow the spec
        (a regression task's `--set tasks.NAME.bins=...`); None: the classes are fixed by training."""
        return None

    def state(self) -> dict:
        """What this head learnt outside the model's weights (a threshold, a scaling, a fitted distribution):
        JSON values, saved in checkpoints and put back by `load_state`."""
        return {}

    def load_state(self, state: dict) -> None:
        """Put back what `state` returned."""
