"""The training and validation loaders of a run: decode + resize each image once (the cache), seeded
augmentation, an epoch sampler that depends only on (seed, epoch), and torch DataLoaders around them."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from framework import transforms as T
from framework.data import faces
from framework.data.dataset import DiskCache, ImageDataset, prepare
from framework.errors import DataError, FieldError


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


def num_workers(setting) -> int:
    if setting != "auto":
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 2 else min(8, cores // 2)


def disk_cache(recipe, size: tuple[int, int]) -> DiskCache:
    """The disk cache for this recipe's resize stage (its settings are part of every key)."""
    from importlib.metadata import version

    settings = json.dumps([list(size), recipe.transforms.resize.model_dump(), version("albumentations")])
    return DiskCache(recipe.data.cache_dir, settings, int(recipe.data.cache_max_gb * 1e9))


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
    faces: dict | None = None  # where face boxes came from (data / detector / none), when something needs them


@dataclass
class _Used:
    """The rows of the plan that a run uses (train and val sides), with their targets."""

    rows: list[dict]
    sides: list[str]
    y: list[tuple]  # per row, one number per task: class index (-1 = none) or a regression value (NaN = none)
    strata: list[int]
    codes: dict[str, list[int]]


def _used_rows(plan, use_boxes: bool) -> _Used:
    used = [i for i, s in enumerate(plan.sides) if s != "unused"]  # rows left out are never decoded
    rows = [plan.rows[i] for i in used]
    if not use_boxes:  # nothing looks at face boxes: do not carry them
        rows = [{**r, "box": None} if r.get("box") else r for r in rows]
    y_all = list(zip(*(plan.values.get(t, c) for t, c in plan.ys.items())))
    return _Used(rows, [plan.sides[i] for i in used], [tuple(y_all[i]) for i in used],
                 [plan.strata[i] for i in used], {t: [c[i] for i in used] for t, c in plan.ys.items()})


def _decode_all(recipe, u: _Used, resize, size, detector, show_progress: bool):
    """Decode + resize each image once (memory or disk cache), or nothing now (cache none: decoded per access)."""
    if recipe.data.cache not in ("memory", "disk"):
        return None, None, [], None
    disk = disk_cache(recipe, size) if recipe.data.cache == "disk" else None
    images, boxes, failures = prepare(u.rows, resize, threads=os.cpu_count() or 2, detector=detector, cache=disk,
                                      progress="decode+resize" if recipe.logging.progress and show_progress else None)
    if failures and recipe.data.bad_images == "error":
        listed = "; ".join(f"{u.rows[i]['path']} ({why})" for i, why in failures[:5])
        raise FieldError(("data", "bad_images"), f"{len(failures)} image(s) cannot be used: {listed}"
                         + (" ..." if len(failures) > 5 else "") + ".",
                         "remove or replace them, or set data.bad_images: skip to train without them.", DataError)
    return images, boxes, failures, disk


def build_loaders(recipe, plan, size: tuple[int, int], show_progress: bool, cpu: bool) -> Loaders:
    """Decode and resize each used image once (the cache), then the training and validation datasets and loaders."""
    tr = recipe.train
    augs = T.build_augmentations(recipe.transforms, size)
    use_boxes = T.needs_face_box(augs) or recipe.transforms.resize.face_margin is not None
    u = _used_rows(plan, use_boxes)
    if use_boxes and recipe.data.cache == "none" and not all(r.get("box") for r in u.rows):  # detection: cached
        raise FieldError(("data", "cache"), "some images have no face box, and face detection runs once per image "
                         "in the cached resize stage.", "set data.cache: memory (the default) or disk.")
    resize = T.resize_stage(size, recipe.transforms.resize, with_boxes=any(r.get("box") for r in u.rows) or use_boxes)
    augment = T.augmentation_stage(augs, with_boxes=T.needs_face_box(augs))
    detector = faces.for_recipe(recipe) if use_boxes and not all(r.get("box") for r in u.rows) else None
    images, boxes, failures, disk = _decode_all(recipe, u, resize, size, detector, show_progress)
    bad = {i for i, _ in failures}  # skipped images leave both sides
    tr_idx = [i for i, s in enumerate(u.sides) if s == "train" and i not in bad]
    va_idx = [i for i, s in enumerate(u.sides) if s == "val" and i not in bad]

    def subset(idx, aug):
        picked = None if images is None else (images.subset(idx) if disk else [images[i] for i in idx])
        cached = None if images is None else (picked, [boxes[i] for i in idx])
        return ImageDataset([u.rows[i] for i in idx], [u.y[i] for i in idx], resize, aug, cached, seed=tr.seed)

    train_ds, val_ds = subset(tr_idx, augment if augment.transforms else None), subset(va_idx, None)
    sampler = EpochSampler([u.strata[i] for i in tr_idx], tr.seed, mode=tr.sampler)
    workers = num_workers(tr.num_workers)
    common = dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=not cpu)
    train_loader = DataLoader(train_ds, batch_size=tr.batch_size, sampler=sampler, drop_last=False, **common)
    val_loader = DataLoader(val_ds, batch_size=recipe.eval.batch_size or 2 * tr.batch_size, shuffle=False, **common)
    no_face = sum(b is None for b in train_ds.boxes) if use_boxes and train_ds.boxes is not None else 0
    cache = {"mode": recipe.data.cache} | ({"hits": disk.hits, "misses": disk.misses} if disk else {})
    found = None
    if use_boxes and boxes is not None:
        kept = [i for i in range(len(u.rows)) if i not in bad]
        found = faces.box_counts([u.rows[i] for i in kept], [boxes[i] for i in kept], [u.sides[i] for i in kept],
                                 [_first_class(plan, u.y[i]) for i in kept], detector)
    return Loaders(train_ds, sampler, train_loader, val_loader, resize, [(u.rows[i]["path"], why) for i, why in failures],
                   {t: [c[i] for i in tr_idx] for t, c in u.codes.items()}, cache, no_face, found)


def _first_class(plan, y: tuple) -> str:
    """The class name of a row's first task (for counts per class)."""
    task, labels = next(iter(plan.labels.items()))
    k = y[0]
    return labels.classes[int(k)] if isinstance(k, (int, np.integer)) and 0 <= k < len(labels.classes) else "?"
