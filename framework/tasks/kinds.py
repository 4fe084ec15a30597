"""The built-in task kinds: classification, regression, ordinal, anomaly and one_class, each a `Head` subclass
registered in TASK_KINDS where it is defined."""
from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from framework.errors import DataError, FieldError
from framework.libs import lazy
from framework.registry import TASK_KINDS
from framework.tasks.head import Head

torch, F = lazy("torch"), lazy("torch.nn.functional")  # imported when a head computes, not for `validate`


class ClassArgs(BaseModel):
    """What a classification task may give besides its column."""

    model_config = ConfigDict(extra="forbid")
    bins: list[float] | None = Field(None, description="cut points that turn a number into its bands")
    composite: dict | None = Field(None, description="several labels in one head, e.g. mask x gender x age")


class BandArgs(BaseModel):
    """A task over ordered bands of a number."""

    model_config = ConfigDict(extra="forbid")
    bins: list[float] = Field(description="the cut points of the bands its metrics and predictions use, e.g. "
                                          "bins: [30, 60]")


class RareArgs(BaseModel):
    """A rare class against the rest."""

    model_config = ConfigDict(extra="forbid")
    anomaly: str = Field(min_length=1, description="the rare class, e.g. anomaly: '60+'")
    bins: list[float] | None = Field(None, description="cut points that turn a number into its bands")


@TASK_KINDS.register("classification", args=ClassArgs)
class Classification(Head):
    """One class per band or value."""

    class_offsets = True


@TASK_KINDS.register("regression", args=BandArgs)
class Regression(Head):
    """Predict the number; its bands (`bins`) are the classes of the metrics and predictions. The head learns the
    number standardised by the training split's mean and spread (`center`, `scale`, saved in the checkpoint), so its
    loss starts near 1 like a class head's instead of at tens of years, and does not drown the other heads of a
    shared backbone; `value` undoes the scaling."""

    kind, learns, default_loss = "regression", "number", "smooth_l1"
    center, scale = 0.0, 1.0  # checkpoints written before standardisation load with these

    def fit_targets(self, values) -> None:
        """The mean and spread of the training values: the head learns the number standardised by them."""
        values = values[~np.isnan(values)]
        if len(values):
            spread = float(values.std())
            self.center, self.scale = float(values.mean()), spread if spread > 0 else 1.0

    @property
    def out_dim(self) -> int:
        return 1

    def has(self, col):
        return ~torch.isnan(col)

    def bands(self, col):
        band = torch.bucketize(col.float().contiguous(), self.bins.to(col.device), right=True)
        return torch.where(torch.isnan(col), torch.full_like(band, -1), band)

    def _loss(self, out, col, fn):
        pred, target = out[:, 0].float(), (col.float() - self.center) / self.scale
        if isinstance(fn, torch.nn.SmoothL1Loss):  # its beta is in the data's units (5 years): the same in z-units
            return F.smooth_l1_loss(pred, target, beta=fn.beta / self.scale, reduction=fn.reduction)
        return fn(pred, target)  # l1, mse: the loss in years divided by the scale (its square): the same optimum

    def eval_loss(self):
        return torch.nn.L1Loss(reduction="sum")  # in standard units, as training's

    def value(self, out: torch.Tensor) -> torch.Tensor:
        """The predicted number (N,), in the data's units."""
        return out[:, 0].float() * self.scale + self.center

    def estimate(self, probs, value, band_means):
        return None if value is None else (value, "the predicted number")

    @classmethod
    def classes_after_training(cls, spec):
        from framework.data.labels import LabelSet, bin_names

        return LabelSet(bin_names(spec.bins))  # its bands are cut from the number: they may move

    def state(self):
        return {"center": self.center, "scale": self.scale}

    def load_state(self, state):
        self.center, self.scale = float(state.get("center", self.center)), float(state.get("scale", self.scale))

    def probs(self, out):
        band = torch.bucketize(self.value(out).contiguous(), self.bins.to(out.device), right=True)
        return F.one_hot(band, len(self.classes)).float()

    def extra_outputs(self, out, col):
        return torch.stack([self.value(out), col.float()], 1)  # (N, 2): predicted, true

    def after_validation(self, extra, y_true, y_pred):
        has = ~np.isnan(extra[:, 1])
        return {"mae": float(np.abs(extra[has, 0] - extra[has, 1]).mean()) if has.any() else float("nan")}


class _Binary(Head):
    """Heads trained with binary cross-entropy (mean over the images): their summed loss is mean x count."""

    def summed_loss(self, out, col):
        return float(self.loss(out, col, None)) * int(self.has(col).sum())


@TASK_KINDS.register("ordinal", args=BandArgs)
class Ordinal(_Binary):
    """'Is the band above k' heads over ordered `bins`."""

    kind = "ordinal"

    @property
    def out_dim(self) -> int:
        return len(self.classes) - 1

    def _loss(self, out, col, fn):
        above = (col[:, None] > torch.arange(self.out_dim, device=col.device)).float()  # target k: band above k
        return F.binary_cross_entropy_with_logits(out.float(), above)

    def probs(self, out):
        above = torch.sigmoid(out.float())  # P(band > k), k = 0 .. C-2
        ones, zeros = torch.ones_like(above[:, :1]), torch.zeros_like(above[:, :1])
        running_min = [torch.amin(above[:, :k + 1], dim=1, keepdim=True) for k in range(above.shape[1])]
        cum = torch.cat([ones, *running_min, zeros], dim=1)  # monotone (a running minimum; ONNX has no cummin)
        return (cum[:, :-1] - cum[:, 1:]).clamp(min=0)


@TASK_KINDS.register("anomaly", args=RareArgs)
class Anomaly(_Binary):
    """The class named in `anomaly` against the rest, with a threshold chosen on the validation split."""

    kind = "anomaly"

    @classmethod
    def positive_weight(cls, train_codes, class_weights):
        """With class_weights auto: negatives per positive of the training split (the rare class weighs more)."""
        if class_weights != "auto":
            return None
        codes = [c for c in train_codes if c >= 0]
        positives = max(1, sum(codes))
        return (len(codes) - positives) / positives

    @classmethod
    def label_codes(cls, codes, labels, spec, where):
        from framework.data.labels import LabelSet

        if spec.anomaly not in labels.classes:
            raise FieldError(where + ("anomaly",), f"{spec.anomaly!r} is not one of the classes {labels.classes}.",
                             "name one of them, e.g. the last bin's name.", DataError)
        k = labels.classes.index(spec.anomaly)
        return [-1 if c < 0 else int(c == k) for c in codes], LabelSet([f"not {spec.anomaly}", spec.anomaly])

    @classmethod
    def reading_spec(cls, spec, labels):
        return spec  # its classes are the recipe's; label_codes turns them into the rare one against the rest

    @property
    def out_dim(self) -> int:
        return 1

    def _loss(self, out, col, fn):
        weight = None if self.pos_weight is None else torch.tensor(self.pos_weight, device=out.device)
        return F.binary_cross_entropy_with_logits(out[:, 0].float(), col.float(), pos_weight=weight)

    def score(self, out: torch.Tensor) -> torch.Tensor:
        """The anomaly score (N,) in 0..1."""
        return torch.sigmoid(out[:, 0].float())

    def probs(self, out):
        t = min(max(self.threshold, 1e-6), 1 - 1e-6)
        s = torch.sigmoid(out[:, 0].float() - math.log(t / (1 - t)))  # shifted so that 0.5 is the chosen threshold
        return torch.stack([1 - s, s], dim=1)

    def extra_outputs(self, out, col):
        return self.score(out)

    def estimate(self, probs, value, band_means):
        return None  # "the rare band or not" says nothing of the number

    def state(self):
        return {"threshold": self.threshold}

    def load_state(self, state):
        self.threshold = float(state.get("threshold", self.threshold))

    def after_validation(self, extra, y_true, y_pred):
        """The threshold with the best validation F1 of the anomaly class; the predictions are redone with it."""
        has = y_true >= 0
        self.threshold, _ = best_threshold(extra[has], y_true[has])
        y_pred[:] = (extra > self.threshold).astype(int)
        return {"threshold": self.threshold}


@TASK_KINDS.register("one_class", args=RareArgs)
class OneClass(Anomaly):
    """The anomaly kind trained on the normal population only: the score is the squared Mahalanobis distance of an
    image's features (a fixed random projection of the backbone's to 32 dimensions) from the normal training
    images' mean, under their covariance (shrunk towards its diagonal). The distribution is fitted again before
    each validation; no image of the rare class is used, except to choose the threshold on validation. For when the
    rare group has too few images to learn from. The backbone learns only from other tasks (or pretrained weights):
    this head passes it no gradient."""

    kind = "one_class"
    dims = 32

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mean: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None

    @property
    def out_dim(self) -> int:
        return self.dims

    def _loss(self, out, col, fn):
        return out.sum() * 0.0  # nothing is learnt by gradient: the normal distribution is fitted

    def fit_normal(self, z: np.ndarray) -> None:
        """Mean and precision of the normal images' outputs z (N, dims)."""
        z = np.asarray(z, dtype=np.float64)
        cov = np.cov(z, rowvar=False) if len(z) > 1 else np.eye(z.shape[1])
        shrink = 0.1  # towards the diagonal: stable with few images
        cov = (1 - shrink) * cov + shrink * np.diag(np.diag(cov)) + 1e-6 * np.eye(len(cov))
        self.mean = torch.tensor(z.mean(0), dtype=torch.float32)
        self.precision = torch.tensor(np.linalg.inv(cov), dtype=torch.float32)

    def score(self, out):
        """1 - exp(-d^2 / (2 dims)), in 0..1, increasing with the Mahalanobis distance d."""
        if self.mean is None:
            return torch.zeros(len(out))
        d = out.float() - self.mean.to(out.device)
        d2 = ((d @ self.precision.to(out.device)) * d).sum(1)
        return 1 - torch.exp(-d2 / (2 * self.dims))

    def probs(self, out):
        t = min(max(self.threshold, 1e-6), 1 - 1e-6)
        s = self.score(out).clamp(1e-6, 1 - 1e-6)
        shifted = torch.sigmoid(torch.log(s / (1 - s)) - math.log(t / (1 - t)))  # 0.5 at the chosen threshold
        return torch.stack([1 - shifted, shifted], dim=1)

    def before_validation(self, training_outputs):
        """Fitted again to the normal training images' outputs (label 0)."""
        out, col = training_outputs(self.name)
        self.fit_normal(out[col == 0].numpy())

    def state(self):
        fitted = {} if self.mean is None else {"mean": self.mean.tolist(), "precision": self.precision.tolist()}
        return super().state() | fitted

    def load_state(self, state):
        super().load_state(state)
        if "mean" in state:
            self.mean = torch.tensor(state["mean"], dtype=torch.float32)
            self.precision = torch.tensor(state["precision"], dtype=torch.float32)


def best_threshold(scores, labels) -> tuple[float, float]:
    """The threshold on anomaly scores with the best F1 of the anomaly class, and that F1."""
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
