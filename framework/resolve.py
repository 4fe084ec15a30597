"""Resolve a loaded recipe: every check that does not need training, shared by `recipe validate` and `recipe run`.

Every name is looked up through its registry (backbone, transforms, loss, reader, task kind), every file the recipe
points at is opened (weights, images), trackers are imported, the monitored metric is one the tasks produce, and
size-bound augmentations and the backbone agree with the image size. `run` calls this before it makes a run
folder, so a recipe that validates does not fail for any of these reasons, and one that would leaves nothing behind.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass

from framework.build import DataPlan, build_data, check_classes, keep_few
from framework.tasks import head_class
from framework.errors import DataError, FieldError, Issue, RecipeError, did_you_mean, shorten
from framework.recipe.loaded import LoadedRecipe


@dataclass
class Resolved:
    """A recipe with every check passed: its concrete image size, its data plan and what `run` needs."""

    loaded: LoadedRecipe
    plan: DataPlan
    image_size: tuple[int, int]
    trackers: list[str]  # Accelerate trackers besides TensorBoard (which the engine writes itself)

    @property
    def recipe(self):
        return self.loaded.recipe


def resolve(loaded: LoadedRecipe) -> Resolved:
    """All the checks, in the order a user fixes them: model and augmentations, then the data, then the metric.
    Problems come back as one RecipeError naming file, line and field; warnings go to `loaded.warnings`."""
    fast = _fast_dev_value()
    size, trackers = check_recipe(loaded)
    with loaded.errors_located():
        plan = build_data(loaded.recipe, classes=False)
        check_images(loaded, plan)  # a missing file first: else it shows as a class with no training image
        check_classes(plan)
        check_monitor(loaded.recipe, plan)
    _data_warnings(loaded, plan)
    if fast:
        _fast_dev_run(loaded, plan, fast)
    return Resolved(loaded, plan, size, trackers)


def check_recipe(loaded: LoadedRecipe) -> tuple[tuple[int, int], list[str]]:
    """The checks that need no data (model and weights, augmentations, trackers, losses, hooks, places to write);
    returns the image size and the trackers. `recipe tune` runs them for each value it may try."""
    with loaded.errors_located():
        check_model_args(loaded.recipe)
        check_face_detector(loaded.recipe)
        size = _model(loaded)
        _augmentations(loaded, size)
        trackers = check_trackers(loaded.recipe.logging.trackers)
        _task_losses(loaded.recipe)
        _review_hooks(loaded.recipe)
        check_sync_batchnorm(loaded.recipe.train, int(os.environ.get("WORLD_SIZE", "1")))
        check_places(loaded.recipe)
    return size, trackers


FAST_DEV_RUN = "RECIPE_FAST_DEV_RUN"


def _fast_dev_value() -> int:
    """`RECIPE_FAST_DEV_RUN=N` (like Lightning's fast_dev_run): the whole recipe runs, every check included, on N
    images per class and side, to see that a recipe or a command works end to end in seconds. 0: unset."""
    value = os.environ.get(FAST_DEV_RUN, "").strip()
    if value and not (value.isascii() and value.isdigit() and len(value) < 10):  # (str.isdigit takes '²')
        raise RecipeError(Issue(f"{FAST_DEV_RUN}={value!r} is not a number of images.",
                                fix=f"set {FAST_DEV_RUN} to images per class and side (e.g. 8), or unset it."))
    return int(value or 0)


def _fast_dev_run(loaded: LoadedRecipe, plan: DataPlan, per_class: int) -> None:
    left_out = keep_few(plan, per_class)
    loaded.warnings.append(Issue(f"fast dev run ({FAST_DEV_RUN}={per_class}): {left_out} image(s) left out, "
                                 f"{per_class} per class and side kept; the figures of this run mean nothing.",
                                 file=str(loaded.path), fix=f"unset {FAST_DEV_RUN} for a real run."))


def _model(loaded: LoadedRecipe) -> tuple[int, int]:
    """The backbone's name and its input size (`image_size: auto` becomes the backbone's own, so that the run folder
    reruns as is); the weights file; the size checked by a shapes-only forward pass."""
    from framework.backbones import check_pretrained, resolve_inputs

    recipe = loaded.recipe
    size, _, _ = resolve_inputs(recipe)  # checks the backbone name, with a did-you-mean
    if recipe.transforms.image_size == "auto":
        recipe.transforms.image_size = size
    if recipe.model.weights:
        # a source's weights are converted (once, then cached); a file exists, reads, holds tensors (no code runs)
        from framework.models import check_weights_fit
        from framework.weights import resolve_file

        check_weights_fit(recipe.model, resolve_file(recipe.model.weights, recipe.model.backbone), size)
    check_pretrained(recipe.model)
    check_input_size(recipe.model, size)
    return size


def check_input_size(model_cfg, size: tuple[int, int]) -> None:
    """The backbone can take images of this size: one shapes-only forward pass on the meta device
    (`models.size_problem`). For a timm backbone the answer is cached by everything that shapes the network (plugin
    code can change under the same name), so a validate that has seen it before imports no torch."""
    from framework.backbones import backbone_defaults, plugin_backbone, remembered

    def ask():
        from framework.models import size_problem

        return size_problem(model_cfg, size)

    shaping = model_cfg.model_dump(mode="json", exclude={"weights", "pretrained", "compile", "channels_last"})
    key = json.dumps([shaping, list(size)], sort_keys=True)
    plugin = plugin_backbone(model_cfg.backbone) is not None
    problem = ask() if plugin else remembered("sizes", key, ask, lambda a: a is None or isinstance(a, str))
    if problem is not None:
        native = backbone_defaults(model_cfg.backbone)["input_size"]
        raise FieldError(("transforms", "image_size"), f"{model_cfg.backbone} cannot take {size[0]}x{size[1]} images "
                         f"({shorten(str(problem))}).",
                         f"use a larger image size, e.g. its default {native[0]}x{native[1]} (transforms.image_size: "
                         "auto), or another backbone.")


def check_face_detector(recipe) -> None:
    """The face detector is installed; `auto` becomes the one used (mtcnn where facenet-pytorch is installed, else
    haar), so the run folder says which found its boxes."""
    from framework.data import faces

    spec = recipe.transforms.face_detector
    missing = faces.missing_package(spec.name)
    if missing:
        raise FieldError(("transforms", "face_detector", "name"), *missing)
    spec.name = faces.concrete(spec.name)


def check_places(recipe) -> None:
    """The folders a run writes (output.root, the disk cache) can be written, so a run never fails after its folder
    exists."""
    from framework.io import FileProblem, check_writable_folder

    places = [(("output", "root"), recipe.output.root, "give a folder you can write, e.g. --set output.root=runs.")]
    if recipe.data.cache == "disk":
        places.append((("data", "cache_dir"), recipe.data.cache_dir, "give a folder you can write, or "
                       "data.cache: memory."))
    for where, folder, fix in places:
        try:
            check_writable_folder(folder)
        except FileProblem as e:
            raise FieldError(where, f"{e.path} {e.reason}.", fix) from None


def check_model_args(recipe) -> None:
    """model.args carries no file for timm to load on its own: weights go through `model.weights`."""
    loaders = sorted(set(recipe.model.args) & {"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay",
                                                 "pretrained"})
    if loaders:
        raise FieldError(("model", "args", loaders[0]), f"model.args.{loaders[0]} would have timm load weights on "
                         "its own (unchecked, and failing with its own traceback).",
                         "give the file as model.weights: PATH (read with weights_only, shapes checked) and "
                         "pretrained weights as model.weights: NAME.")


def _augmentations(loaded: LoadedRecipe, size: tuple[int, int]) -> None:
    """Every augmentation built with its own argument schema; crops that disagree with the image size are errors,
    things that are wrong for faces or repeat the resize stage's work are warnings."""
    from framework import transforms as T

    augs = T.build_augmentations(loaded.recipe.transforms, size)
    errors = T.size_errors(augs, size)
    if errors:
        raise FieldError.many(errors)
    for path, message, fix in T.lint(augs, size) + T.dropped(loaded.recipe.transforms):
        loaded.warn(path, message, fix)


def check_trackers(names: list[str]) -> list[str]:
    """Accelerate trackers besides TensorBoard; each must be known to Accelerate and installed."""
    if all(n == "tensorboard" for n in names):
        return []  # written by the engine itself: nothing to import
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for i, n in enumerate(names):
        if n not in LOGGER_TYPE_TO_CLASS:
            raise FieldError(("logging", "trackers", i), f"unknown tracker {n!r}.{did_you_mean(n, LOGGER_TYPE_TO_CLASS)}",
                             f"use tensorboard or one of Accelerate's trackers: {', '.join(LOGGER_TYPE_TO_CLASS)}.")
        if n != "tensorboard" and importlib.util.find_spec(n) is None:
            raise FieldError(("logging", "trackers", i), f"tracker {n!r} is not installed.",
                             f"pip install {n}, or remove it (TensorBoard works with nothing extra).")
    return [n for n in names if n != "tensorboard"]


def _task_losses(recipe) -> None:
    """Each task's loss suits its kind (a regression loss for a regression task, and only there)."""
    problems = []
    for task, spec in recipe.task_specs().items():
        try:
            head_class(spec.kind).loss_spec(spec, recipe.train.loss)
        except FieldError as e:
            own = recipe.tasks is not None and spec.loss is not None  # the task's own loss, else train.loss
            problems += [(("tasks", task, "loss", "name") if own else ("train", "loss", "name"), m, f)
                         for _, m, f in e.items]
    if problems:
        raise FieldError.many(problems)


def _review_hooks(recipe) -> None:
    if recipe.logging.cam_every and importlib.util.find_spec("pytorch_grad_cam") is None:
        raise FieldError(("logging", "cam_every"), "Grad-CAM logging needs the grad-cam package, which is not "
                         "installed.", 'pip install -e ".[review]" (or grad-cam), or set logging.cam_every: 0.')


def check_sync_batchnorm(train, processes: int) -> None:
    """PyTorch's SyncBatchNorm runs on GPUs only: several CPU processes would fail at the first training step."""
    if not (train.sync_batchnorm and processes > 1):
        return
    import torch

    if not torch.cuda.is_available():
        raise FieldError(("train", "sync_batchnorm"), f"synchronised batch norm needs GPUs, and these {processes} "
                         "processes run on the CPU (PyTorch's SyncBatchNorm has no CPU kernel).",
                         "set train.sync_batchnorm: false (each process then normalises with its own share of the "
                         "batch), or run on GPUs.")


def check_images(loaded: LoadedRecipe, plan: DataPlan) -> None:
    """Every image the run would read is a regular file: a count and the first few missing, per source. With
    `data.bad_images: skip` they are a warning (the run leaves them out)."""
    missing: dict[str, list[str]] = {}
    for row, side in zip(plan.rows, plan.sides):
        if side != "unused" and not os.path.isfile(row["path"]):
            missing.setdefault(row.get("source", "?"), []).append(row["path"])
    if not missing:
        return
    names = [s.name for s in loaded.recipe.data.sources]
    items = []
    for source, paths in missing.items():
        where = ("data", "sources", names.index(source)) if source in names else ("data",)
        shown = ", ".join(paths[:3]) + (" ..." if len(paths) > 3 else "")
        items.append((where, f"{len(paths)} image(s) of source {source!r} do not exist (or are not regular files): "
                             f"{shown}.",
                      "fix the paths (relative to data.root), restore the files, or set data.bad_images: skip to "
                      "train without them."))
    if loaded.recipe.data.bad_images == "skip":
        for where, message, _ in items:
            loaded.warn(where, message + " They will be skipped.")
        return
    raise FieldError.many(items, DataError)


def monitor_names(recipe, labels: dict, sources: list[str] | tuple = ()) -> list[str]:
    """Metrics `checkpoint.monitor` can name: overall, per task, the composite of all tasks, the MAE of regression
    tasks (use checkpoint.mode: min for those), and per validated source when there are several (`sources`)."""
    specs = recipe.task_specs()
    names = []
    for side in ("val", "train"):
        names += [f"{side}/{m}" for m in ("macro_f1", "accuracy", "loss")]
        questions = [q for lab in labels.values() for q in (lab.parts or {})]  # a composite head's questions
        if len(labels) > 1 or questions:
            names += [f"{side}/{t}/{m}" for t in list(labels) * (len(labels) > 1) + questions + ["composite"]
                      for m in ("macro_f1", "accuracy")]
    regression = [t for t in labels if head_class(specs[t].kind).learns == "number"]
    if regression:
        names += ["val/mae"] + [f"val/{t}/mae" for t in regression]
    if len(sources) > 1:
        names += [f"val/source/{name}/{m}" for name in sources for m in ("macro_f1", "accuracy")]
    return names


def check_monitor(recipe, plan: DataPlan) -> None:
    validated = sorted({plan.rows[i]["source"] for i in plan.indices("val")})
    monitors = monitor_names(recipe, plan.labels, validated)
    if recipe.checkpoint.monitor not in monitors:
        raise FieldError(("checkpoint", "monitor"), f"unknown metric {recipe.checkpoint.monitor!r}."
                         f"{did_you_mean(recipe.checkpoint.monitor, monitors)}", f"use one of: {', '.join(monitors)}.")


def _data_warnings(loaded: LoadedRecipe, plan: DataPlan) -> None:
    if plan.dropped:
        loaded.warn(("data", "missing_label"), f"{plan.dropped} row(s) without a label were dropped.")
    for train_file, val_file in plan.duplicates[:5]:
        loaded.warnings.append(Issue(f"byte-identical files on both sides of the split: {train_file} and "
                                     f"{val_file}.", field="validation", file=str(loaded.path),
                                     fix="give duplicates the same group id."))
    if len(plan.duplicates) > 5:
        loaded.warnings.append(Issue(f"... {len(plan.duplicates) - 5} more byte-identical pairs.", file=str(loaded.path)))
    _tiny_found_classes(loaded, plan)


def _tiny_found_classes(loaded: LoadedRecipe, plan: DataPlan) -> None:
    """Classes taken from the data (no `classes` declared) with a handful of rows are often typos ('dog' for
    'dogs'), and each one counts as a whole class in macro-F1: say so, with the counts."""
    from framework.data.labels import task_path

    for task, spec in loaded.recipe.task_specs().items():
        if spec.classes or spec.bins is not None or spec.composite:
            continue
        counts = {c: plan.ys[task].count(k) for k, c in enumerate(plan.labels[task].classes)}
        tiny = {c: n for c, n in counts.items() if n < max(3, 0.01 * len(plan.rows))}
        if tiny:
            loaded.warn(task_path(plan.named_tasks, task) + ("column",),
                        "classes found in the data with very few rows: " + ", ".join(f"{c!r} ({n})" for c, n in tiny.items())
                        + f" (of {len(counts)} classes); each counts as a whole class in macro-F1.",
                        "if they are typos, declare `classes` (undeclared values are then an error naming them) "
                        "or fix them with `map`.")
