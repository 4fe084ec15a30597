"""The training loop on Accelerate: fit() trains a recipe into a run folder; evaluate() scores a loader.

Read it top to bottom: setup (data in `build_loaders`, then model -> optimizer) in `build_setup`, then `fit` loops
over epochs: train one epoch, validate every N, log, checkpoint. Randomness is seeded per epoch (and per sample for
augmentation), so a resumed run continues exactly where the straight run would be.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from framework import transforms as T
from framework.data.dataset import ImageDataset, prepare
from framework.engine import checkpoint as ckpt
from framework.engine.metrics import confusion, scores
from framework.errors import DataError, FieldError, Interrupted, Issue, did_you_mean
from framework.losses import MultiTaskLoss, build_loss
from framework.tasks import best_threshold, build_heads
from framework.models import backbone_defaults, build_model, outputs

def monitor_names(labels: dict) -> list[str]:
    """Metrics `checkpoint.monitor` can name: overall, per task, and the composite of all tasks."""
    names = []
    for side in ("val", "train"):
        names += [f"{side}/{m}" for m in ("macro_f1", "accuracy", "loss")]
        if len(labels) > 1:
            names += [f"{side}/{t}/{m}" for t in list(labels) + ["composite"] for m in ("macro_f1", "accuracy")]
    names += ["val/mae"] + [f"val/{t}/mae" for t in labels]  # regression tasks (use checkpoint.mode: min)
    return names


class EpochSampler(Sampler):
    """Random order, or class-weighted draws, that depend only on (seed, epoch): resumable by construction.

    mode "balanced" draws every class equally often; "sqrt" draws a class in proportion to the square root of its
    size (a middle ground: the rare class is drawn more often than its share, its few images repeated less)."""

    def __init__(self, labels: list[int], seed: int, mode: str = "random"):
        if mode not in ("random", "balanced", "sqrt"):
            raise ValueError(f"unknown sampler mode {mode!r}: random, balanced or sqrt")
        self.labels, self.seed, self.mode, self.epoch = labels, seed, mode, 0
        counts = np.bincount(labels).astype(float)
        power = {"random": 0.0, "balanced": 1.0, "sqrt": 0.5}[mode]  # item weight = class size ** -power
        self.weights = torch.tensor([counts[t] ** -power for t in labels], dtype=torch.double)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        """Yields (epoch, index): the epoch travels with each index, so (persistent) loader workers seed the
        augmentation of the right epoch without sharing state with the main process."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.mode != "random":
            order = torch.multinomial(self.weights, len(self.labels), replacement=True, generator=g).tolist()
        else:
            order = torch.randperm(len(self.labels), generator=g).tolist()
        return iter([(self.epoch, i) for i in order])

    def __len__(self) -> int:
        return len(self.labels)


class StopSignal:
    """SIGINT / SIGTERM set a flag instead of killing the loop; training stops after the current optimizer step,
    saves a resumable checkpoint and exits. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.received: str | None = None
        self._old: dict = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False

    def should_stop(self, accelerator) -> bool:
        """True on every process as soon as any process received a signal."""
        flag = self.received is not None
        if accelerator.num_processes > 1:
            t = torch.tensor([float(flag)], device=accelerator.device)
            flag = bool(accelerator.reduce(t, reduction="sum").item() > 0)
        return flag


def lr_lambda(sched, steps_per_epoch: int, total_steps: int):
    """Multiplier of the base learning rate at optimizer step `s` (0-based)."""
    if sched.name == "constant":
        return lambda s: 1.0
    if sched.name == "step":
        return lambda s: sched.gamma ** ((s // max(1, steps_per_epoch)) // sched.every_epochs)
    warm = int(sched.warmup_epochs * steps_per_epoch)

    def cosine(s):
        if s < warm:
            return (s + 1) / (warm + 1)
        t = (s - warm) / max(1, total_steps - warm)
        return sched.min_lr_ratio + (1 - sched.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return cosine


def num_workers(setting) -> int:
    if setting != "auto":
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 2 else min(8, cores // 2)


@dataclass
class Setup:
    """Everything a run is made of, built from the recipe."""

    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: torch.nn.Module
    train_ds: ImageDataset
    sampler: EpochSampler
    train_loader: DataLoader
    val_loader: DataLoader
    image_size: tuple[int, int]
    notes: list[str]
    skipped: list[tuple[str, str]]
    heads: dict | None = None  # task -> framework.tasks.Head
    no_face: int = 0  # training images without a face box (when an augmentation needs one)
    validations: int = 0
    cam_paths: list | None = None  # the fixed misclassified validation images whose Grad-CAMs are logged
    cam_boxes: list | None = None  # their face boxes (for a resize stage that crops to faces)
    resize: object = None
    cache: dict | None = None
    ema: torch.nn.Module | None = None  # the averaged weights (train.ema), used to validate and to predict
    ema_decay: float = 0.0
    mixup: float = 0.0  # Beta(a, a) of train.mixup; 0 = off

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema if self.ema is not None else self.model


def _task_loss(spec, train):
    """A task's loss spec: its own, else train.loss; a regression task defaults to smooth L1."""
    from framework.losses import REGRESSION_LOSSES

    loss = spec.loss or train.loss
    if spec.kind == "regression" and loss.name not in REGRESSION_LOSSES:
        if spec.loss is not None:
            raise FieldError(("tasks", "loss", "name"), f"{loss.name!r} is not a regression loss.",
                             f"use one of: {', '.join(REGRESSION_LOSSES)}.")
        loss = loss.model_copy(update={"name": "smooth_l1", "class_weights": "none"})
    if spec.kind != "regression" and loss.name in REGRESSION_LOSSES:
        raise FieldError(("tasks", "loss", "name"), f"{loss.name!r} is a regression loss, but this task is "
                         f"{spec.kind}.", "use cross_entropy, focal or f1.")
    return loss


def model_inputs(recipe) -> tuple[tuple[int, int], tuple, tuple]:
    """Input size (h, w) and normalization mean/std: the recipe's, else the backbone's own."""
    defaults = backbone_defaults(recipe.model.backbone)
    size = T.image_size_of(recipe.transforms, defaults["input_size"])
    norm = recipe.transforms.normalize
    mean, std = (norm.mean, norm.std) if norm else (defaults["mean"], defaults["std"])
    return size, mean, std


def disk_cache(recipe):
    """The disk cache for this recipe's resize stage (its settings are part of every key)."""
    from importlib.metadata import version

    from framework.data.dataset import DiskCache

    size, _, _ = model_inputs(recipe)
    settings = json.dumps([list(size), recipe.transforms.resize.model_dump(), version("albumentations")])
    return DiskCache(recipe.data.cache_dir, settings, int(recipe.data.cache_max_gb * 1e9))


def build_optimizer(params, opt_cfg) -> torch.optim.Optimizer:
    if opt_cfg.name == "sgd":
        return torch.optim.SGD(params, lr=opt_cfg.lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay,
                               nesterov=opt_cfg.nesterov)
    return torch.optim.AdamW(params, lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay, betas=opt_cfg.betas)


@dataclass
class Loaders:
    """The training and validation side of a run: cached datasets, the epoch sampler and the loaders."""

    train_ds: ImageDataset
    sampler: EpochSampler
    train_loader: DataLoader
    val_loader: DataLoader
    resize: object
    skipped: list[tuple[str, str]]  # (path, why) of the images left out of both sides
    train_codes: dict[str, list[int]]  # per task, the class index of each training image (-1 = no label)
    cache: dict
    no_face: int = 0  # training images without a face box (when something needs one)


def build_loaders(recipe, plan, show_progress: bool, cpu: bool) -> Loaders:
    """Decode and resize each used image once (the cache), then the training and validation datasets and loaders."""
    tr = recipe.train
    size, _, _ = model_inputs(recipe)
    # Face boxes (from the data, else detected once) follow the resize, for box-aware augmentations.
    augs = T.build_augmentations(recipe.transforms)
    use_boxes = T.needs_face_box(augs) or recipe.transforms.resize.face_margin is not None
    used = [i for i, s in enumerate(plan.sides) if s != "unused"]  # rows left out are never decoded
    rows, sides = [plan.rows[i] for i in used], [plan.sides[i] for i in used]
    # per row, one number per task: the class index (-1 = no label), or a regression task's value (NaN = none)
    y_all = list(zip(*(plan.values.get(t, c) for t, c in plan.ys.items())))
    y, strata = [tuple(y_all[i]) for i in used], [plan.strata[i] for i in used]
    codes = {t: [c[i] for i in used] for t, c in plan.ys.items()}  # class indices of the used rows
    if not use_boxes:  # nothing looks at face boxes: do not carry them
        rows = [{**r, "box": None} if r.get("box") else r for r in rows]
    elif recipe.data.cache == "none" and not all(r.get("box") for r in rows):  # detection needs a cache
        raise FieldError(("data", "cache"), "some images have no face box, and face detection runs once per image "
                         "in the cached resize stage.", "set data.cache: memory (the default) or disk.")
    resize = T.resize_stage(size, recipe.transforms.resize, with_boxes=any(r.get("box") for r in rows) or use_boxes)
    augment = T.augmentation_stage(augs, with_boxes=T.needs_face_box(augs))

    # Decode + resize each image once (cache), or check nothing now and decode on every access.
    images = boxes = None
    failures: list[tuple[int, str]] = []
    disk = disk_cache(recipe) if recipe.data.cache == "disk" else None
    if recipe.data.cache in ("memory", "disk"):
        images, boxes, failures = prepare(rows, resize, threads=os.cpu_count() or 2, detect=use_boxes, cache=disk,
                                          progress=recipe.logging.progress and show_progress)
        if failures and recipe.data.bad_images == "error":
            listed = "; ".join(f"{rows[i]['path']} ({why})" for i, why in failures[:5])
            raise FieldError(("data", "bad_images"), f"{len(failures)} image(s) cannot be used: {listed}"
                             + (" ..." if len(failures) > 5 else "") + ".",
                             "remove or replace them, or set data.bad_images: skip to train without them.", DataError)
    bad = {i for i, _ in failures}  # skipped images leave both sides
    tr_idx = [i for i, s in enumerate(sides) if s == "train" and i not in bad]
    va_idx = [i for i, s in enumerate(sides) if s == "val" and i not in bad]

    def subset(idx, aug):
        picked = None if images is None else (images.subset(idx) if disk else [images[i] for i in idx])
        return ImageDataset([rows[i] for i in idx], [y[i] for i in idx], resize, aug, picked,
                            [boxes[i] for i in idx] if images is not None else None, seed=tr.seed)

    train_ds, val_ds = subset(tr_idx, augment if augment.transforms else None), subset(va_idx, None)
    sampler = EpochSampler([strata[i] for i in tr_idx], tr.seed, mode=tr.sampler)
    workers = num_workers(tr.num_workers)
    common = dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=not cpu)
    train_loader = DataLoader(train_ds, batch_size=tr.batch_size, sampler=sampler, drop_last=False, **common)
    val_loader = DataLoader(val_ds, batch_size=recipe.eval.batch_size or 2 * tr.batch_size, shuffle=False, **common)
    no_face = sum(b is None for b in train_ds.boxes) if use_boxes and train_ds.boxes is not None else 0
    cache = {"mode": recipe.data.cache} | ({"hits": disk.hits, "misses": disk.misses} if disk else {})
    skipped = [(rows[i]["path"], why) for i, why in failures]
    train_codes = {t: [c[i] for i in tr_idx] for t, c in codes.items()}
    return Loaders(train_ds, sampler, train_loader, val_loader, resize, skipped, train_codes, cache, no_face)


def build_setup(recipe, plan, run_dir: Path) -> Setup:
    """Accelerator, data (build_loaders), model with its heads, loss, optimizer and schedule."""
    from accelerate import Accelerator

    tr = recipe.train
    monitors = monitor_names(plan.labels)
    if recipe.checkpoint.monitor not in monitors:
        raise FieldError(("checkpoint", "monitor"), f"unknown metric {recipe.checkpoint.monitor!r}."
                         f"{did_you_mean(recipe.checkpoint.monitor, monitors)}", f"use one of: {', '.join(monitors)}.")
    cpu = not torch.cuda.is_available()
    extra_trackers = _trackers(recipe.logging.trackers)
    accelerator = Accelerator(cpu=cpu, mixed_precision="no" if cpu else tr.mixed_precision,
                              gradient_accumulation_steps=tr.grad_accum, log_with=extra_trackers or None,
                              project_dir=str(run_dir))
    d = build_loaders(recipe, plan, accelerator.is_main_process, cpu)

    size, mean, std = model_inputs(recipe)
    torch.manual_seed(tr.seed)
    heads = build_heads(recipe, plan.labels, d.train_codes)
    model, notes = build_model(recipe.model, {t: h.out_dim for t, h in heads.items()}, mean, std, size)
    ema = _ema_copy(model) if tr.ema else None
    if recipe.model.compile:
        model.net.forward = torch.compile(model.net.forward)  # compiles the computation, keeps the state_dict keys
    specs = recipe.task_specs()
    loss_fn = MultiTaskLoss(heads, {task: build_loss(_task_loss(specs[task], tr), len(h.classes),
                                                     [c for c in d.train_codes[task] if c >= 0])
                                    for task, h in heads.items()},
                            {task: specs[task].weight for task in heads})
    optimizer = build_optimizer(model.parameters(), tr.optimizer)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, d.train_loader, d.val_loader)
    loss_fn = loss_fn.to(accelerator.device)  # not prepared: it has no trainable parameters to synchronise
    steps_per_epoch = math.ceil(len(train_loader) / tr.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(tr.scheduler, steps_per_epoch, steps_per_epoch * tr.epochs))
    if recipe.logging.cam_every:
        from framework.explain import _require_gradcam
        _require_gradcam()
    return Setup(accelerator, model, optimizer, scheduler, loss_fn, d.train_ds, d.sampler, train_loader, val_loader,
                 size, notes, d.skipped, heads, d.no_face, resize=d.resize, cache=d.cache,
                 ema=ema.to(accelerator.device) if ema is not None else None, ema_decay=tr.ema or 0.0,
                 mixup=tr.mixup)


def _ema_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * model, with d = min(decay, (1 + step) / (10 + step)) so that the first steps
    are not dominated by the random initial weights; integer buffers (batch counts) are copied."""
    d = min(decay, (1 + step) / (10 + step))
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.lerp_(m.detach(), 1 - d)
        else:
            e.copy_(m)


def _trackers(names: list[str]) -> list[str]:
    """Accelerate trackers besides TensorBoard (which the runner writes itself); each must be installed."""
    import importlib.util

    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for i, n in enumerate(names):
        if n not in LOGGER_TYPE_TO_CLASS:
            raise FieldError(("logging", "trackers", i), f"unknown tracker {n!r}.{did_you_mean(n, LOGGER_TYPE_TO_CLASS)}",
                             f"use tensorboard or one of Accelerate's trackers: {', '.join(LOGGER_TYPE_TO_CLASS)}.")
        if n != "tensorboard" and importlib.util.find_spec(n) is None:
            raise FieldError(("logging", "trackers", i), f"tracker {n!r} is not installed.",
                             f"pip install {n}, or remove it (TensorBoard works with nothing extra).")
    return [n for n in names if n != "tensorboard"]


def _shard_log(acc):
    """Diagnostics: with RECIPE_SHARD_LOG=DIR each process appends the training rows it saw to DIR/rank<N>.txt."""
    folder = os.environ.get("RECIPE_SHARD_LOG")
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return open(Path(folder) / f"rank{acc.process_index}.txt", "a", encoding="utf-8")


def _predictions(heads: dict, logits: dict) -> torch.Tensor:
    return torch.stack([h.predict(logits[t]) for t, h in heads.items()], dim=1)  # (N, T) band indices


def _bands(heads: dict, labels: torch.Tensor) -> torch.Tensor:
    return torch.stack([h.bands(labels[:, j]) for j, h in enumerate(heads.values())], dim=1)  # (N, T), -1 = none


def train_epoch(s: Setup, epoch: int, progress: bool, clip: float | None, stop: StopSignal | None = None,
                partial: dict | None = None) -> dict:
    """One pass over the training data; metrics over the whole epoch. With `stop`, it may end early after an
    optimizer step (`interrupted` is then set); `partial` continues an epoch interrupted that way."""
    acc, model = s.accelerator, s.model
    model.train()
    preds, targets, loss_sum, seen, done = [], [], 0.0, 0, 0
    loader = s.train_loader
    if partial:
        preds, targets = [torch.as_tensor(partial["preds"])], [torch.as_tensor(partial["targets"])]
        loss_sum, seen, done = partial["loss_sum"], partial["seen"], partial["batches"]
        torch.set_rng_state(partial["torch_rng"])
        loader = acc.skip_first_batches(loader, done)
    start = time.perf_counter()
    bar = _bar(loader, f"epoch {epoch}", progress and acc.is_main_process)
    interrupted = False
    shard_log = _shard_log(acc)
    for images, labels, index in bar:  # labels: (N, T), -1 where a task has no label; index: dataset rows
        if shard_log:
            shard_log.write(f"{epoch} {' '.join(map(str, index.tolist()))}\n")
        with acc.accumulate(model):
            if s.mixup:  # training metrics then score each blend against its larger part's labels
                logits, loss, labels = _mixup_step(s, images, labels, (s.sampler.seed, epoch, done, acc.process_index))
            else:
                logits = model(images)  # task -> (N, C_task)
                loss = s.loss_fn(logits, labels)
            acc.backward(loss)
            if acc.sync_gradients and clip:
                acc.clip_grad_norm_(model.parameters(), clip)
            s.optimizer.step()
            if acc.sync_gradients and not acc.optimizer_step_was_skipped:
                s.scheduler.step()
                if s.ema is not None:
                    ema_update(s.ema, acc.unwrap_model(model), s.ema_decay, s.scheduler.last_epoch)
            s.optimizer.zero_grad(set_to_none=True)
        p, t = acc.gather_for_metrics((_predictions(s.heads, logits).detach(), _bands(s.heads, labels)))
        preds.append(p.cpu())
        targets.append(t.cpu())
        loss_sum += float(loss.detach()) * len(labels)
        seen += len(labels)
        done += 1
        if hasattr(bar, "set_postfix"):
            rate = seen / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", img_s=f"{rate * acc.num_processes:.0f}")
        if stop is not None and acc.sync_gradients and stop.should_stop(acc):
            interrupted = True
            break
    if shard_log:
        shard_log.close()
    elapsed = time.perf_counter() - start
    y_true, y_pred = torch.cat(targets).numpy(), torch.cat(preds).numpy()
    out = {"images_per_sec": (seen - (partial or {}).get("seen", 0)) / max(elapsed, 1e-9) * acc.num_processes,
           "seconds": elapsed, "y_true": y_true, "y_pred": y_pred}
    if interrupted:
        return out | {"interrupted": True, "partial": {"batches": done, "loss_sum": loss_sum, "seen": seen,
                                                       "preds": torch.cat(preds), "targets": torch.cat(targets),
                                                       "torch_rng": torch.get_rng_state()}}
    mean_loss = torch.tensor([loss_sum, seen], dtype=torch.float64, device=acc.device)
    mean_loss = acc.reduce(mean_loss, reduction="sum")
    return out | {"loss": float(mean_loss[0] / mean_loss[1])}


def _mixup_step(s: Setup, images: torch.Tensor, labels: torch.Tensor, key: tuple):
    """Mixup (Zhang et al. 2018): each image blended with another of the batch by a Beta(a, a) weight lam, and the
    loss blended the same way (any loss, any number of heads). Drawn from `key` (seed, epoch, batch, process), so a
    resumed run mixes the same pairs. Returns the logits, the loss and the labels of each blend's larger part."""
    rng = np.random.default_rng(list(key))
    lam = float(rng.beta(s.mixup, s.mixup))
    perm = torch.from_numpy(rng.permutation(len(labels))).to(labels.device)
    mixed = lam * images.float() + (1 - lam) * images[perm].float()  # the model takes 0..255 floats as uint8
    logits = s.model(mixed)
    loss = lam * s.loss_fn(logits, labels) + (1 - lam) * s.loss_fn(logits, labels[perm])
    return logits, loss, labels if lam >= 0.5 else labels[perm]


@torch.no_grad()
def evaluate(accelerator, model, loader, heads: dict, progress: bool = False, tta: str | None = None) -> dict:
    """Loss, band predictions and probabilities over the whole loader; each sample counted exactly once.
    Also the raw anomaly scores and the predicted and true numbers of regression tasks.

    The loss is the sum over tasks of the task's mean loss on the samples that have its label (cross-entropy for
    classification, L1 for regression, binary cross-entropy for ordinal and anomaly heads). With tta "hflip" the
    outputs are the mean of the image's and its mirror image's (as `recipe predict --tta hflip` computes them)."""
    model.eval()
    targets, probs, scores, values = [], {}, {}, {}
    loss_sums: dict[str, float] = dict.fromkeys(heads, 0.0)
    summed = {t: torch.nn.L1Loss(reduction="sum") if h.kind == "regression" else
              torch.nn.CrossEntropyLoss(reduction="sum") for t, h in heads.items()}
    for images, labels, _ in _bar(loader, "validate", progress and accelerator.is_main_process):
        out, labels = accelerator.gather_for_metrics((outputs(model, images, tta), labels))
        targets.append(labels.cpu())
        for j, (task, head) in enumerate(heads.items()):
            v, col = out[task].float(), labels[:, j]
            has = head.has(col)
            if has.any():  # summed losses; the BCE of ordinal and anomaly heads comes as a mean
                loss_sums[task] += float(head.loss(v, col, summed[task])) * (
                    1 if head.kind in ("classification", "regression") else int(has.sum()))
            probs.setdefault(task, []).append(head.probs(v).cpu())
            if head.kind == "anomaly":
                scores.setdefault(task, []).append(head.score(v).cpu())
            if head.kind == "regression":
                values.setdefault(task, []).append(torch.stack([head.value(v), col.float()], 1).cpu())
    raw = torch.cat(targets)
    y_true = torch.stack([h.bands(raw[:, j]) for j, h in enumerate(heads.values())], 1).numpy()
    prob = {t: torch.cat(p).numpy() for t, p in probs.items()}
    counts = (y_true >= 0).sum(0)
    loss = sum(loss_sums[t] / max(1, counts[j]) for j, t in enumerate(heads))
    y_pred = np.stack([p.argmax(1) for p in prob.values()], axis=1)
    return {"loss": float(loss), "y_true": y_true, "y_pred": y_pred, "proba": prob,
            "scores": {t: torch.cat(v).numpy() for t, v in scores.items()},
            "values": {t: torch.cat(v).numpy() for t, v in values.items()}}


def choose_thresholds(heads: dict, v_stats: dict) -> dict[str, float]:
    """For every anomaly task: the threshold with the best validation F1 of the anomaly class; the task's
    predictions are redone with it."""
    chosen = {}
    for j, (task, head) in enumerate(heads.items()):
        if head.kind != "anomaly":
            continue
        y = v_stats["y_true"][:, j]
        has = y >= 0
        head.threshold, _ = best_threshold(v_stats["scores"][task][has], y[has])
        v_stats["y_pred"][:, j] = (v_stats["scores"][task] > head.threshold).astype(int)
        chosen[task] = head.threshold
    return chosen


def regression_extras(heads: dict, v_stats: dict) -> dict[str, dict]:
    """Per regression task: the mean absolute error of the predicted number."""
    out = {}
    for task, pv in v_stats["values"].items():
        has = ~np.isnan(pv[:, 1])
        out[task] = {"mae": float(np.abs(pv[has, 0] - pv[has, 1]).mean()) if has.any() else float("nan")}
    return out


def _bar(it, desc: str, show: bool):
    if not show or not sys.stderr.isatty():  # bars only for people watching; logs get the epoch lines
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


def summarize(y_true: np.ndarray, y_pred: np.ndarray, labels: dict, loss: float | None = None,
              extras: dict | None = None) -> dict:
    """Scores of every task on the samples labelled for it; with several tasks, their mean and the composite
    label over the samples that have every task (index = mixed radix in task order, e.g. mask*6 + gender*3 + age).

    y_true, y_pred: (N, T) class indices, -1 in y_true where a sample has no label for that task."""
    per = {}
    for j, (task, lab) in enumerate(labels.items()):
        has = y_true[:, j] >= 0
        per[task] = scores(confusion(y_true[has, j], y_pred[has, j], len(lab.classes)), lab.classes)
        per[task].update((extras or {}).get(task, {}))  # a regression task's MAE, an anomaly task's threshold
    if len(per) == 1:
        out = dict(next(iter(per.values())))
    else:
        out = {"accuracy": float(np.mean([p["accuracy"] for p in per.values()])),
               "macro_f1": float(np.mean([p["macro_f1"] for p in per.values()])), "tasks": per}
        full = (y_true >= 0).all(1)
        if full.any():
            names, codes_true, codes_pred = [""], np.zeros(full.sum(), int), np.zeros(full.sum(), int)
            for j, lab in enumerate(labels.values()):
                n = len(lab.classes)
                names = [f"{a}/{b}" if a else b for a in names for b in lab.classes]
                codes_true = codes_true * n + y_true[full, j]
                codes_pred = codes_pred * n + y_pred[full, j]
            out["composite"] = scores(confusion(codes_true, codes_pred, len(names)), names)
    if loss is not None:
        out["loss"] = loss
    return out


def fit(recipe, plan, run_dir: Path, summary: dict, resume: dict | None = None, log=print) -> dict:
    """Train `recipe` on `plan` into `run_dir`; returns the final summary (also written as summary.json)."""
    s = build_setup(recipe, plan, run_dir)
    acc = s.accelerator
    main = acc.is_main_process
    labels = plan.labels
    tr = recipe.train
    start_epoch, best, partial = 1, {"value": None, "epoch": None}, None
    if resume is not None:
        acc.unwrap_model(s.model).load_state_dict(resume.get("train_model") or resume["model"])
        if s.ema is not None:
            s.ema.load_state_dict(resume["model"])
        s.optimizer.load_state_dict(resume["optimizer"])
        s.scheduler.load_state_dict(resume["scheduler"])
        if acc.scaler is not None and resume.get("scaler"):
            acc.scaler.load_state_dict(resume["scaler"])
        start_epoch, best, partial = resume["epoch"] + 1, resume["best"], resume.get("partial")
        for task, t in resume.get("thresholds", {}).items():
            s.heads[task].threshold = t
    summary.update(image_size=list(s.image_size), num_train=len(s.train_ds), num_val=len(s.val_loader.dataset),
                   skipped_images=len(s.skipped), no_face_images=s.no_face, cache=s.cache, weights_notes=s.notes,
                   processes=acc.num_processes, device=str(acc.device))
    writer = None
    if main:
        for note in s.notes:
            log(f"weights: {note}")
        if s.no_face:
            log(f"faces: {s.no_face} of {len(s.train_ds)} training images have no face box in the data and none "
                "was detected; they are used whole (give the data's boxes with a source's box_columns)")
        if s.skipped:
            _write_skipped(run_dir / "skipped.csv", s.skipped)
            log(f"skipped {len(s.skipped)} unreadable image(s), listed in {run_dir / 'skipped.csv'}")
        writer = _writer(run_dir, recipe, s, labels, start_epoch)
        _trim_metrics(run_dir / "metrics.jsonl", start_epoch)
        ckpt.write_json(run_dir / "summary.json", summary)
    if acc.log_with:
        acc.init_trackers(run_dir.name, config=json.loads(recipe.model_dump_json()))
    with StopSignal() as stop:
        for epoch in range(start_epoch, tr.epochs + 1):
            best = _epoch(s, recipe, plan, run_dir, epoch, best, stop, partial if epoch == start_epoch else None,
                          writer, summary, log)
    if writer is not None:
        writer.close()
    if acc.log_with:
        acc.end_training()
    acc.free_memory()
    return summary


def _epoch(s: Setup, recipe, plan, run_dir: Path, epoch: int, best: dict, stop, partial, writer, summary, log):
    """Train one epoch, validate when due, log and checkpoint; returns the best-so-far."""
    acc, labels = s.accelerator, plan.labels
    main = acc.is_main_process
    tr, cp = recipe.train, recipe.checkpoint
    random.seed(tr.seed + epoch)
    np.random.seed((tr.seed + epoch) % 2**32)
    torch.manual_seed(tr.seed * 1000 + epoch)
    s.train_loader.set_epoch(epoch)  # Accelerate's loader passes it on to the sampler (and would else count)
    t_stats = train_epoch(s, epoch, recipe.logging.progress, tr.clip_grad_norm, stop, partial)
    if t_stats.get("interrupted"):
        if main:
            state = _state(acc, s, epoch - 1, best, labels, recipe) | {"partial": t_stats["partial"]}
            ckpt.save(run_dir / "checkpoints" / "last.pt", state)
        acc.wait_for_everyone()
        raise Interrupted(Issue(f"stopped by {stop.received} in epoch {epoch} after "
                                f"{t_stats['partial']['batches']} batches; a resumable checkpoint is saved. "
                                f"Continue with `recipe run --resume {run_dir}`."))
    record = {"epoch": epoch, "lr": s.optimizer.param_groups[0]["lr"],
              "train": summarize(t_stats["y_true"], t_stats["y_pred"], labels, t_stats["loss"])
              | {"images_per_sec": t_stats["images_per_sec"], "seconds": t_stats["seconds"]}}
    if epoch % recipe.eval.every == 0 or epoch == tr.epochs:
        v_stats = evaluate(acc, s.eval_model, s.val_loader, s.heads, recipe.logging.progress, recipe.eval.tta)
        thresholds = choose_thresholds(s.heads, v_stats)
        extras = regression_extras(s.heads, v_stats)
        for task, t in thresholds.items():
            extras.setdefault(task, {})["threshold"] = t
        record["val"] = summarize(v_stats["y_true"], v_stats["y_pred"], labels, v_stats["loss"], extras)
        s.validations += 1
        if recipe.logging.cam_every and s.validations % recipe.logging.cam_every == 0 and main and writer:
            _log_cams(s, recipe, labels, v_stats, writer, epoch)
    flat = _flat(record)
    improved = False
    if cp.monitor in flat:
        v = flat[cp.monitor]
        improved = best["value"] is None or (v > best["value"] if cp.mode == "max" else v < best["value"])
        if improved:
            best = {"value": v, "epoch": epoch}
    if main:
        log(_line(record, best, cp.monitor, tr.epochs))
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        _log_tb(writer, record, labels)
        state = _state(acc, s, epoch, best, labels, recipe)
        ckpt.save(run_dir / "checkpoints" / "last.pt", state)
        if improved:
            ckpt.save(run_dir / "checkpoints" / "best.pt", state)
        if cp.every and epoch % cp.every == 0:
            ckpt.save(run_dir / "checkpoints" / f"epoch_{epoch:04d}.pt", state)
            _prune(run_dir / "checkpoints", cp.keep_last)
        summary.update(best_metric=cp.monitor, best_value=best["value"], best_epoch=best["epoch"],
                       epochs_done=epoch, last=_compact(record))
        ckpt.write_json(run_dir / "summary.json", summary)
    if acc.log_with:
        acc.log({k: v for k, v in flat.items() if isinstance(v, (int, float))}, step=epoch)
    acc.wait_for_everyone()
    return best


def _state(acc, s: Setup, epoch: int, best: dict, labels: dict, recipe) -> dict:
    return {"format": 1, "epoch": epoch, "best": best, "classes": {t: lab.classes for t, lab in labels.items()},
            "thresholds": {t: h.threshold for t, h in s.heads.items() if h.kind == "anomaly"},
            "image_size": list(s.image_size),
            "backbone": recipe.model.backbone,
            # `model` is what predictions use (the average with train.ema); `train_model` what training resumes
            "model": (s.ema if s.ema is not None else acc.unwrap_model(s.model)).state_dict(),
            "train_model": acc.unwrap_model(s.model).state_dict() if s.ema is not None else None,
            "optimizer": s.optimizer.state_dict(),
            "scheduler": s.scheduler.state_dict(), "scaler": acc.scaler.state_dict() if acc.scaler else None,
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                    "numpy": np.random.get_state()[1].tolist()}}


def _flat(record: dict) -> dict:
    """Scalar metrics by name: `val/macro_f1`, and per task `val/mask/macro_f1`, `val/composite/accuracy`."""
    out = {"lr": record["lr"]}
    for side in ("train", "val"):
        if side not in record:
            continue
        r = record[side]
        for k in ("loss", "accuracy", "macro_f1", "images_per_sec", "mae", "threshold"):
            if k in r:
                out[f"{side}/{k}"] = r[k]
        parts = dict(r.get("tasks", {}))
        if "composite" in r:
            parts["composite"] = r["composite"]
        for task, sc in parts.items():
            for k in ("accuracy", "macro_f1", "mae", "threshold"):
                if k in sc:
                    out[f"{side}/{task}/{k}"] = sc[k]
    return out


def _compact(record: dict) -> dict:
    return {k: v for k, v in _flat(record).items()} | {"epoch": record["epoch"]}


def _line(record: dict, best: dict, monitor: str, epochs: int) -> str:
    t = record["train"]
    text = (f"epoch {record['epoch']}/{epochs}  train loss {t['loss']:.4f} acc {t['accuracy']:.3f} "
            f"f1 {t['macro_f1']:.3f}")
    if "val" in record:
        v = record["val"]
        text += f" | val loss {v['loss']:.4f} acc {v['accuracy']:.3f} f1 {v['macro_f1']:.3f}"
        if "tasks" in v:
            text += " (" + ", ".join(f"{t} {sc['macro_f1']:.3f}" for t, sc in v["tasks"].items()) + ")"
    if best["value"] is not None:
        text += f" | best {monitor} {best['value']:.4f} @{best['epoch']}"
    return text + f" | {t['images_per_sec']:.0f} img/s, {t['seconds']:.1f}s"


def _writer(run_dir: Path, recipe, s: Setup, labels: dict, start_epoch: int):
    from torch.utils.tensorboard import SummaryWriter

    from framework.engine.tb import sample_grid

    if "tensorboard" not in recipe.logging.trackers:
        return None
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_epoch if start_epoch > 1 else None)
    if start_epoch == 1:
        import yaml
        text = yaml.safe_dump(json.loads(recipe.model_dump_json()), sort_keys=False)
        writer.add_text("recipe", "    " + text.replace("\n", "\n    "), 0)
        n = min(recipe.logging.sample_grid, len(s.train_ds))
        if n:
            picks = np.linspace(0, len(s.train_ds) - 1, n).astype(int)
            items = [s.train_ds[(1, int(i))] for i in picks]  # what the model sees in epoch 1
            names = ["/".join(lab.classes[int(k)] for lab, k in zip(labels.values(), _bands(s.heads, y[None])[0].tolist())
                              if k >= 0) for _, y, _ in items]
            grid = sample_grid([im for im, _, _ in items], names)
            writer.add_image("train/augmented_samples", grid, 0, dataformats="HWC")
    return writer


def _log_tb(writer, record: dict, labels: dict) -> None:
    if writer is None:
        return
    from framework.engine.tb import confusion_image

    epoch = record["epoch"]
    for k, v in _flat(record).items():
        writer.add_scalar(k, v, epoch)
    if "val" in record:
        val = record["val"]
        if "tasks" not in val:
            writer.add_image("val/confusion_matrix", confusion_image(val["confusion"], next(iter(labels.values())).classes),
                             epoch, dataformats="HWC")
        for task, sc in list(val.get("tasks", {}).items()) + ([("composite", val["composite"])] if "composite" in val else []):
            writer.add_image(f"val/{task}/confusion_matrix", confusion_image(sc["confusion"], list(sc["per_class"])),
                             epoch, dataformats="HWC")
    writer.flush()


def _log_cams(s: Setup, recipe, labels: dict, v_stats: dict, writer, epoch: int) -> None:
    """Grad-CAMs of the same misclassified validation images (chosen at the first time) into TensorBoard."""
    from types import SimpleNamespace

    from framework.explain import cams, contact_sheet, overlay

    if s.cam_paths is None:
        y, p = v_stats["y_true"], v_stats["y_pred"]
        wrong = np.nonzero(((y != p) & (y >= 0)).any(1))[0]  # wrong on some task it has a label for
        rows = s.val_loader.dataset.rows
        s.cam_paths = [rows[i]["path"] for i in wrong[: recipe.logging.cam_images]]
        s.cam_boxes = [rows[i].get("box") for i in wrong[: recipe.logging.cam_images]]
    if not s.cam_paths:
        return
    model = s.ema if s.ema is not None else s.accelerator.unwrap_model(s.model)
    run = SimpleNamespace(model=model, resize=s.resize, recipe=recipe,
                          tasks={t: {"classes": lab.classes} for t, lab in labels.items()})
    items = cams(run, s.cam_paths, boxes=s.cam_boxes)
    if s.ema is None:
        model.train()
    for it in items:
        it["overlay"] = overlay(it["image"], it["heat"])
    writer.add_image("val/gradcam", contact_sheet(items), epoch, dataformats="HWC")


def _trim_metrics(path: Path, start_epoch: int) -> None:
    """On resume, drop metric lines of epochs after the checkpoint (a crashed run may have written them)."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(ln)["epoch"] < start_epoch:
                keep.append(ln)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    ckpt.atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _prune(folder: Path, keep: int) -> None:
    numbered = sorted(folder.glob("epoch_*.pt"))
    for old in numbered[:-keep]:
        old.unlink(missing_ok=True)


def _write_skipped(path: Path, skipped) -> None:
    import csv
    import io
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "reason"])
    w.writerows(skipped)
    ckpt.atomic_write_text(path, buf.getvalue())


__all__ = ["fit", "evaluate", "build_loaders", "build_setup", "train_epoch", "summarize", "EpochSampler"]
