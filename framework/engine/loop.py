"""The loop itself: train one epoch, evaluate a loader. Nothing here knows about run folders, logging or hooks."""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from framework.optim import backbone_bn_eval, ema_update
from framework.processes import main_process


@dataclass
class _Tally:
    """What one training epoch has seen so far (also the partial epoch an interrupted run saves)."""

    preds: list = field(default_factory=list)
    targets: list = field(default_factory=list)
    loss_sum: float = 0.0
    seen: int = 0
    batches: int = 0

    @classmethod
    def resumed(cls, partial: dict | None) -> "_Tally":
        if not partial:
            return cls()
        return cls([torch.as_tensor(partial["preds"])], [torch.as_tensor(partial["targets"])], partial["loss_sum"],
                   partial["seen"], partial["batches"])

    def partial(self) -> dict:
        return {"batches": self.batches, "loss_sum": self.loss_sum, "seen": self.seen, "preds": torch.cat(self.preds),
                "targets": torch.cat(self.targets), "torch_rng": torch.get_rng_state()}


def train_epoch(b, epoch: int, progress: bool, stop=None, partial: dict | None = None) -> dict:
    """One pass over the training data of the built run `b`; metrics over the whole epoch. With `stop`, it may end
    early after an optimizer step (`interrupted` is then set); `partial` continues an epoch interrupted that way."""
    acc = b.accelerator
    b.model.train()
    backbone_bn_eval(acc.unwrap_model(b.model), b.loop.freeze_bn or epoch <= b.loop.freeze_epochs)
    tally, loader = _Tally.resumed(partial), b.train_loader
    if partial:
        torch.set_rng_state(partial["torch_rng"])
        loader = acc.skip_first_batches(loader, tally.batches)
    start = time.perf_counter()
    bar = _bar(loader, f"epoch {epoch}", progress and main_process())
    interrupted = False
    steps = {"first": (epoch - 1) * len(b.train_loader) + tally.batches, "loss": [], "lr": []}  # for TensorBoard
    with _shard_log(acc) as shard_log:
        for images, labels, index in bar:  # labels: (N, T), -1 where a task has no label; index: dataset rows
            shard_log(f"{epoch} {' '.join(map(str, index.tolist()))}\n")
            logits, loss, labels = _step(b, images, labels, (b.loaders.sampler.seed, epoch, tally.batches))
            p, t = acc.gather_for_metrics((_predictions(b.heads, logits).detach(), _bands(b.heads, labels)))
            tally.preds.append(p.cpu())
            tally.targets.append(t.cpu())
            value = float(loss.detach())
            if not math.isfinite(value):
                _not_finite(value, epoch, tally.batches + 1)
            steps["loss"].append(value)
            steps["lr"].append(b.optimizer.param_groups[-1]["lr"])
            tally.loss_sum += value * len(labels)
            tally.seen += len(labels)
            tally.batches += 1
            if hasattr(bar, "set_postfix"):
                rate = tally.seen / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{tally.loss_sum / tally.seen:.3f}", img_s=f"{rate * acc.num_processes:.0f}")
            if stop is not None and acc.sync_gradients and stop.should_stop(acc):
                interrupted = True
                break
    elapsed = time.perf_counter() - start
    out = {"images_per_sec": (tally.seen - (partial or {}).get("seen", 0)) / max(elapsed, 1e-9) * acc.num_processes,
           "seconds": elapsed, "y_true": torch.cat(tally.targets).numpy(), "y_pred": torch.cat(tally.preds).numpy(),
           "steps": steps}
    if interrupted:
        return out | {"interrupted": True, "partial": tally.partial()}
    mean_loss = acc.reduce(torch.tensor([tally.loss_sum, tally.seen], dtype=torch.float64, device=acc.device),
                           reduction="sum")
    return out | {"loss": float(mean_loss[0] / mean_loss[1])}


def _not_finite(value: float, epoch: int, step: int):
    """A loss of nan or inf poisons every weight it touches: stop at once, keep the last good checkpoint."""
    from framework.errors import Issue, RunError

    raise RunError(Issue(f"the training loss is {value} in epoch {epoch}, step {step}; training stopped there, and "
                         "the checkpoints of the epochs before it are kept as they were.",
                         field="train", fix="lower train.optimizer.lr, set train.clip_grad_norm (e.g. 1.0), or look "
                         "for broken labels or a loss that divides by zero; with mixed_precision fp16, try bf16."))


def _step(b, images: torch.Tensor, labels: torch.Tensor, key: tuple):
    """One forward / backward / optimizer step (with gradient accumulation, clipping, schedule and EMA).
    Returns the logits, the loss and the labels the training metrics score (mixup: each blend's larger part)."""
    acc, model, tr = b.accelerator, b.model, b.loop
    with acc.accumulate(model):
        if tr.mixup:
            logits, loss, labels = _mixup(b, images, labels, key + (acc.process_index,))
        else:
            logits = model(images)  # task -> (N, C_task)
            loss = b.loss_fn(logits, labels)
        acc.backward(loss)
        if acc.sync_gradients and tr.clip_grad_norm:
            acc.clip_grad_norm_(model.parameters(), tr.clip_grad_norm)
        b.optimizer.step()
        if acc.sync_gradients and not acc.optimizer_step_was_skipped:
            b.scheduler.step()
            if b.ema is not None:
                ema_update(b.ema, acc.unwrap_model(model), tr.ema, b.scheduler.last_epoch)
        b.optimizer.zero_grad(set_to_none=True)
    return logits, loss, labels


def _mixup(b, images: torch.Tensor, labels: torch.Tensor, key: tuple):
    """Mixup (Zhang et al. 2018): each image blended with another of the batch by a Beta(a, a) weight lam, and the
    loss blended the same way (any loss, any number of heads). Drawn from `key` (seed, epoch, batch, process), so a
    resumed run mixes the same pairs. Returns the logits, the loss and the labels of each blend's larger part."""
    rng = np.random.default_rng(list(key))
    a = b.loop.mixup
    lam = float(rng.beta(a, a))
    perm = torch.from_numpy(rng.permutation(len(labels))).to(labels.device)
    mixed = lam * images.float() + (1 - lam) * images[perm].float()  # the model takes 0..255 floats as uint8
    logits = b.model(mixed)
    loss = lam * b.loss_fn(logits, labels) + (1 - lam) * b.loss_fn(logits, labels[perm])
    return logits, loss, labels if lam >= 0.5 else labels[perm]


def _predictions(heads: dict, logits: dict) -> torch.Tensor:
    return torch.stack([h.predict(logits[t]) for t, h in heads.items()], dim=1)  # (N, T) band indices


def _bands(heads: dict, labels: torch.Tensor) -> torch.Tensor:
    return torch.stack([h.bands(labels[:, j]) for j, h in enumerate(heads.values())], dim=1)  # (N, T), -1 = none


def _bar(it, desc: str, show: bool):
    if not show or not sys.stderr.isatty():  # bars only for people watching; logs get the epoch lines
        return it
    from tqdm.auto import tqdm

    from framework.io import bar_size
    return tqdm(it, desc=desc, unit="batch", leave=False, **bar_size())


class _shard_log:
    """Diagnostics: with RECIPE_SHARD_LOG=DIR each process appends the training rows it saw to DIR/rank<N>.txt.
    Used as `with _shard_log(acc) as write: write(line)`; a no-op without the variable."""

    def __init__(self, acc):
        folder = os.environ.get("RECIPE_SHARD_LOG")
        self.file = None
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(folder) / f"rank{acc.process_index}.txt", "a", encoding="utf-8")

    def __enter__(self):
        return self.file.write if self.file else (lambda _line: None)

    def __exit__(self, *exc):
        if self.file:
            self.file.close()
        return False
