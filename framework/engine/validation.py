"""Validation: each head fits what it learns outside gradients, the whole validation split is predicted once (each
image counted exactly once across processes), each kind adds its own figures (a threshold, an MAE), and the
epoch's validation record is made - one call, `validate`, for the runner."""
from __future__ import annotations

import numpy as np
import torch

from framework.engine.loop import _bar
from framework.engine.metrics import by_source, summarize
from framework.models import outputs
from framework.processes import main_process


def validate(b, labels: dict) -> dict:
    """Validate the built run `b` (`labels`: task -> LabelSet): evaluate's result, plus `record`, the metrics
    record of the epoch's validation (per task, per source)."""
    before_validation(b)
    v_stats = evaluate(b.accelerator, b.eval_model, b.val_loader, b.heads, b.loop.progress, b.loop.tta)
    extras = after_validation(b.heads, v_stats)
    for task, added in number_maes(b, v_stats, extras).items():  # ordinal / banded classes: expected value
        extras.setdefault(task, {}).update(added)
    record = summarize(v_stats["y_true"], v_stats["y_pred"], labels, v_stats["loss"], extras)
    rows = b.loaders.val_loader.dataset.rows  # the validated rows (unreadable ones skipped), by position
    sources = by_source(v_stats["y_true"], v_stats["y_pred"], [rows[i]["source"] for i in v_stats["index"]], labels)
    if sources:
        record["sources"] = sources
    return v_stats | {"record": record}


@torch.no_grad()
def evaluate(accelerator, model, loader, heads: dict, progress: bool = False, tta: str | None = None) -> dict:
    """Loss, band predictions and probabilities over the whole loader; each sample counted exactly once; and what
    each kind keeps besides (`extra`: anomaly scores, predicted and true numbers of regression tasks).

    The loss is the sum over tasks of the task's mean validation loss on the samples that have its label. With tta
    "hflip" the outputs are the mean of the image's and its mirror image's (as `recipe predict --tta hflip`)."""
    model.eval()
    targets, probs, extra, order = [], {}, {}, []
    loss_sums: dict[str, float] = dict.fromkeys(heads, 0.0)
    for images, labels, index in _bar(loader, "validate", progress and main_process()):
        out, labels, index = accelerator.gather_for_metrics((outputs(model, images, tta), labels, index))
        targets.append(labels.cpu())
        order.append(index.cpu())
        for j, (task, head) in enumerate(heads.items()):
            v, col = out[task].float(), labels[:, j]
            if head.has(col).any():
                loss_sums[task] += head.summed_loss(v, col)
            probs.setdefault(task, []).append(head.probs(v).cpu())
            kept = head.extra_outputs(v, col)
            if kept is not None:
                extra.setdefault(task, []).append(kept.cpu())
    raw = torch.cat(targets)
    y_true = torch.stack([h.bands(raw[:, j]) for j, h in enumerate(heads.values())], 1).numpy()
    prob = {t: torch.cat(p).numpy() for t, p in probs.items()}
    counts = (y_true >= 0).sum(0)
    loss = sum(loss_sums[t] / max(1, counts[j]) for j, t in enumerate(heads))
    y_pred = np.stack([p.argmax(1) for p in prob.values()], axis=1)
    return {"loss": float(loss), "y_true": y_true, "y_pred": y_pred, "proba": prob,
            "extra": {t: torch.cat(v).numpy() for t, v in extra.items()},
            "index": torch.cat(order).numpy()}  # each item's position in the loader's dataset


def before_validation(b) -> None:
    """Each head fits what it learns outside gradients (a one_class head: the normal training images' outputs).
    The training images' outputs - seen as validation sees them: no augmentation, eval mode - are computed once,
    when the first head asks."""
    kept: dict = {}

    @torch.no_grad()
    def training_outputs(task: str):
        if not kept:
            import copy

            from torch.utils.data import DataLoader

            ds = copy.copy(b.loaders.train_ds)
            ds.augment = None
            model = b.eval_model.eval()
            for images, labels, _ in DataLoader(ds, batch_size=2 * b.loop.batch_size, shuffle=False):
                out = model(images.to(b.accelerator.device))
                for j, t in enumerate(b.heads):
                    kept.setdefault(t, ([], []))[0].append(out[t].float().cpu())
                    kept[t][1].append(labels[:, j])
        outs, cols = kept[task]
        return torch.cat(outs), torch.cat(cols)

    for head in b.heads.values():
        head.before_validation(training_outputs)


def number_maes(b, v_stats: dict, done: dict) -> dict[str, dict]:
    """Per task cut into bands from a number whose MAE its kind does not report itself (`done`: what
    after_validation added): the MAE of the head's estimate of the number (`Head.estimate`: a class or ordinal
    head's expected value), so that `recipe compare` sets it beside a regression run's MAE. Tasks whose training
    bands lack values are left out."""
    from framework.data.labels import numbers
    from framework.engine.metrics import band_means

    out = {}
    val_rows = [b.loaders.val_loader.dataset.rows[i] for i in v_stats["index"]]
    for task, column in b.loop.numbers:
        head = b.heads[task]
        if "mae" in done.get(task, {}):
            continue
        means = lambda: band_means(numbers(b.loaders.train_ds.rows, column), head.bins, len(head.classes))  # noqa: E731,B023
        estimate = head.estimate(v_stats["proba"][task], None, means)
        if estimate is None:
            continue
        truth = np.array(numbers(val_rows, column))
        has = ~np.isnan(truth)
        if has.any():
            out[task] = {"mae": float(np.abs(estimate[0] - truth)[has].mean())}
    return out


def after_validation(heads: dict, v_stats: dict) -> dict[str, dict]:
    """Each kind's own validation step (a regression task's MAE; an anomaly task's threshold, chosen on these
    predictions, which are redone with it): per task, the metrics it adds."""
    extras = {}
    for j, (task, head) in enumerate(heads.items()):
        added = head.after_validation(v_stats["extra"].get(task), v_stats["y_true"][:, j], v_stats["y_pred"][:, j])
        if added:
            extras[task] = added
    return extras
