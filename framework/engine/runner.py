"""fit(): train a built run into its folder. Read it top to bottom: restore (on resume), then per epoch train,
validate when due, log, checkpoint, call the hooks.

Randomness is seeded per epoch (and per sample for augmentation), so a resumed run continues exactly where the
straight run would be. Hooks (`after_validation(ctx)`, e.g. Grad-CAM images) are passed in by the caller; they get
the validation's outputs, its figures and the run log, and must leave the model, its gradients and every RNG stream
as they found them (framework.review.cam_hook does). A hook may end the run early by raising `errors.Pruned` (a
tuning pruner does): the epoch is saved first, and the run's summary says `pruned`, at which epoch and why.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from framework.engine import checkpoint as ckpt
from framework.engine.logging import RunLog
from framework.engine.loop import train_epoch
from framework.engine.metrics import flat_metrics, summarize
from framework.engine.validation import validate
from framework.engine.signals import StopSignal
from framework.errors import Interrupted, Issue
from framework.folders import RunFolder


@dataclass
class EpochContext:
    """What a hook sees after a validation."""

    epoch: int
    built: object  # framework.build.Built
    v_stats: dict  # framework.engine.loop.evaluate's result
    log: RunLog
    metrics: dict = field(default_factory=dict)  # this epoch's figures by monitor name ("val/macro_f1": 0.71)

    @property
    def validations(self) -> int:
        """How many validations the run has made, this one included (a hook acting every N validations)."""
        return self.built.loop.validations(self.epoch)


@dataclass
class _Run:
    """The state of one fit() call: where it writes, the best so far, the hooks."""

    built: object
    plan: object
    run_dir: Path
    summary: dict
    log: RunLog
    hooks: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"value": None, "epoch": None})


def fit(built, plan, log: RunLog, summary: dict, resume: dict | None = None, hooks=()) -> dict:
    """Train `built` on `plan` into the run folder of `log`; returns the final summary (also written as
    summary.json)."""
    r = _Run(built, plan, log.run_dir, summary, log, list(hooks))
    start, partial = 1, None
    if resume is not None:
        start, r.best, partial = ckpt.restore(built, resume)
    _start(r, start)
    try:
        with StopSignal() as stop:
            for epoch in range(start, built.loop.epochs + 1):
                _epoch(r, epoch, stop, partial if epoch == start else None)
    finally:  # also when stopped, pruned or failed: a tuning worker trains many runs in one process
        r.log.close()
        built.accelerator.free_memory()
    return r.summary


def _start(r: _Run, start_epoch: int) -> None:
    b = r.built
    d = b.loaders
    r.summary.update(image_size=list(b.image_size), num_train=len(d.train_ds), num_val=len(d.val_loader.dataset),
                     skipped_images=len(d.skipped), no_face_images=d.no_face, cache=d.cache, weights_notes=b.notes,
                     processes=b.accelerator.num_processes, device=str(b.accelerator.device))
    for note in b.notes:
        r.log.say(f"weights: {note}")
    if d.faces is not None:
        from framework.data.faces import describe

        r.summary["faces"] = d.faces
        for line in describe(d.faces):
            r.log.say(line)
    if d.no_face:
        r.log.say(f"faces: {d.no_face} of {len(d.train_ds)} training images have no face box in the data and none "
                  "was detected; they are used whole (give the data's boxes with a source's box_columns, or "
                  "write them with `recipe faces`)")
    r.log.skipped(d.skipped)
    r.log.start(start_epoch)
    if r.log.main:
        RunFolder(r.run_dir).write_summary(r.summary)


def _seed_epoch(seed: int, epoch: int) -> None:
    random.seed(seed + epoch)
    np.random.seed((seed + epoch) % 2**32)
    torch.manual_seed(seed * 1000 + epoch)


def _epoch(r: _Run, epoch: int, stop: StopSignal, partial: dict | None) -> None:
    """Train one epoch, validate when due, keep what it gave (checkpoint, metrics line, summary), call the hooks."""
    b, loop = r.built, r.built.loop
    _seed_epoch(loop.seed, epoch)
    b.train_loader.set_epoch(epoch)  # Accelerate's loader passes it on to the sampler (and would else count)
    t_stats = train_epoch(b, epoch, loop.progress, stop, partial)
    if t_stats.get("interrupted"):
        _interrupted(r, epoch, stop, t_stats["partial"])
    v_stats = validate(b, r.plan.labels) if loop.validates(epoch) else None
    record = _record(r, epoch, t_stats, v_stats)
    _keep(r, epoch, record, t_stats["steps"])
    if v_stats is not None:
        for hook in r.hooks:
            hook.after_validation(EpochContext(epoch, b, v_stats, r.log, flat_metrics(record)))
    b.accelerator.wait_for_everyone()


def _record(r: _Run, epoch: int, t_stats: dict, v_stats: dict | None) -> dict:
    """The epoch's metrics line: learning rates, the training figures and, when it validated, the validation's."""
    groups = r.built.optimizer.param_groups  # with train.finetune: the backbone's, then the heads'
    record = {"epoch": epoch, "lr": groups[-1]["lr"], **({"lr_backbone": groups[0]["lr"]} if len(groups) > 1 else {}),
              "train": summarize(t_stats["y_true"], t_stats["y_pred"], r.plan.labels, t_stats["loss"])
              | {"images_per_sec": t_stats["images_per_sec"], "seconds": t_stats["seconds"]}}
    if v_stats is not None:
        record["val"] = v_stats["record"]
    return record


def _keep(r: _Run, epoch: int, record: dict, steps) -> None:
    """The best so far, the checkpoints, the metrics line and the summary, in that order: a metrics line never names
    an epoch that has no checkpoint (a kill in between)."""
    loop = r.built.loop
    improved = ckpt.improved(flat_metrics(record).get(loop.monitor), r.best, loop.mode)
    if improved:
        r.best = {"value": flat_metrics(record)[loop.monitor], "epoch": epoch}
    if r.log.main:
        ckpt.save_epoch(RunFolder(r.run_dir), ckpt.training_state(r.built, epoch, r.best), epoch, improved, loop)
    r.log.epoch(record, r.best, steps)
    if r.log.main:
        r.summary.update(best_metric=loop.monitor, best_value=r.best["value"], best_epoch=r.best["epoch"],
                         epochs_done=epoch, last=flat_metrics(record) | {"epoch": epoch})
        RunFolder(r.run_dir).write_summary(r.summary)


def _interrupted(r: _Run, epoch: int, stop: StopSignal, partial: dict) -> None:
    """Save where the epoch stopped (resumable exactly), then stop with the command that continues."""
    if r.log.main:
        state = ckpt.training_state(r.built, epoch - 1, r.best) | {"partial": partial}
        ckpt.save(RunFolder(r.run_dir).checkpoint("last"), state)
    r.built.accelerator.wait_for_everyone()
    raise Interrupted(Issue(f"stopped by {stop.received} in epoch {epoch} after {partial['batches']} batches; a "
                            f"resumable checkpoint is saved. Continue with `recipe run --resume {r.run_dir}`."))
