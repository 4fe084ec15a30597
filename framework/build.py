"""Builders that turn a resolved recipe into objects: the data plan (rows, labels, split; no torch), then the
record of everything a run is made of (`Built`: accelerator, loaders, model, heads, loss, optimizer, schedule)."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from framework.data.labels import LabelSet, assign_tasks, numbers, task_path
from framework.data.readers import read_sources
from framework.data.splits import audit, build_split
from framework.errors import DataError, FieldError
from framework.processes import main_process
from framework.tasks import head_class


@dataclass
class DataPlan:
    """The samples table with each task's labels and the split: everything about the data except pixels."""

    rows: list[dict]
    ys: dict[str, list[int]]  # task -> class index per row, -1 where the row has no label for that task
    labels: dict[str, LabelSet]  # task -> its classes
    sides: list[str]
    dropped: int = 0
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # byte-identical (train, val) files
    named_tasks: bool = False  # tasks come from the recipe's `tasks` (else the single data.target, "label")
    values: dict[str, list[float]] = field(default_factory=dict)  # regression task -> the number per row (NaN)
    numbers: dict[str, list[float]] = field(default_factory=dict)  # task with `bins` -> the number per row (NaN)

    def indices(self, side: str) -> list[int]:
        return [i for i, s in enumerate(self.sides) if s == side]

    @property
    def strata(self) -> list[int]:
        """One stratum per combination of task labels (what `stratify: true` balances)."""
        keys = list(zip(*self.ys.values()))
        ids = {k: n for n, k in enumerate(sorted(set(keys)))}
        return [ids[k] for k in keys]

    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """Images per class of each task on each side: counts[side][task][class]."""
        out: dict = {}
        for side in ("train", "val"):
            idx = self.indices(side)
            out[side] = {}
            for task, labels in self.labels.items():
                c = Counter(self.ys[task][i] for i in idx)
                out[side][task] = {name: c.get(k, 0) for k, name in enumerate(labels.classes)}
        return out

    def describe(self) -> str:
        """`task: class train/val, ...` for logs."""
        counts = self.counts()
        lines = []
        for task, labels in self.labels.items():
            prefix = f"{task}: " if self.named_tasks else ""
            lines.append(prefix + ", ".join(f"{c} {counts['train'][task][c]}/{counts['val'][task][c]}"
                                            for c in labels.classes if counts['train'][task][c] or counts['val'][task][c]))
        return "; ".join(lines)


def build_data(recipe, classes: bool = True) -> DataPlan:
    """Read the sources, label the rows for every task, split them and audit the split for leakage; with `classes`,
    check that every class has training images (resolve checks the files exist first, then calls check_classes)."""
    named = recipe.tasks is not None
    specs = recipe.task_specs()
    rows, ys, labels, dropped = label_rows(read_sources(recipe.data), specs, recipe.data.missing_label, named)
    plan = DataPlan(rows, ys, labels, [], dropped, named_tasks=named)
    plan.values = {t: numbers(rows, s.column) for t, s in specs.items() if head_class(s.kind).learns == "number"}
    plan.numbers = {t: numbers(rows, s.column) for t, s in specs.items() if s.bins is not None and s.column}
    plan.numbers |= {part: numbers(rows, p.column) for s in specs.values() for part, p in (s.composite or {}).items()
                     if p.bins is not None and p.column}  # a composite's banded part (age): split.csv keeps its number
    plan.sides = build_split(rows, plan.strata, recipe.validation, recipe.data.train_only)
    group_by = getattr(recipe.validation, "group_by", "group")
    errors, plan.duplicates = audit(rows, plan.sides, group_by)
    if errors:
        raise FieldError(("validation",), "leakage: " + "; ".join(errors) + ".",
                         "use a grouped policy (holdout/kfold with group_by), or fix the split file so each "
                         "group sits on one side.", DataError)
    if classes:
        check_classes(plan)
    return plan


def label_rows(rows: list[dict], specs: dict, missing: str = "drop", named: bool = True):
    """`assign_tasks`, then each task's labels as its kind learns them (an anomaly task: the rare class vs the rest)."""
    rows, ys, labels, dropped = assign_tasks(rows, specs, missing, named)
    for task, spec in specs.items():
        ys[task], labels[task] = head_class(spec.kind).label_codes(ys[task], labels[task], spec, task_path(named, task))
    return rows, ys, labels, dropped


def check_classes(plan: DataPlan) -> None:
    """Every class must have training images; a class seen only in validation cannot be learned."""
    if not plan.indices("train") or not plan.indices("val"):
        raise FieldError(("validation",), f"the split left {len(plan.indices('train'))} training and "
                         f"{len(plan.indices('val'))} validation images.", "adjust the validation policy.", DataError)
    counts = plan.counts()
    problems = []
    for task, labels in plan.labels.items():
        where = task_path(plan.named_tasks, task)
        train, val = counts["train"][task], counts["val"][task]
        only_val = [c for c in labels.classes if train[c] == 0 and val[c] > 0]
        empty = [c for c in labels.classes if train[c] == 0 and val[c] == 0]
        name = f"task {task!r}: " if plan.named_tasks else ""
        if only_val:
            problems.append((where, f"{name}class(es) {only_val} appear only in validation "
                             f"({', '.join(str(val[c]) for c in only_val)} images): the model cannot learn them.",
                             "add training images of these classes, or drop them from `classes`/`map`."))
        if empty and not labels.parts:
            problems.append((where + ("classes",), f"{name}class(es) {empty} have no images at all.",
                             "remove them from `classes`, or add their images."))
    if problems:
        raise FieldError.many(problems, DataError)


def keep_few(plan: DataPlan, per_class: int) -> int:
    """A fast dev run: keep `per_class` images of each label combination on each side, spread over the rows; the
    rest become `unused` (never decoded). Returns how many were left out."""
    groups = defaultdict(list)
    for i, (side, stratum) in enumerate(zip(plan.sides, plan.strata)):
        if side in ("train", "val"):
            groups[(side, stratum)].append(i)
    keep = {i for idx in groups.values() for i in idx[::max(1, len(idx) // per_class)][:per_class]}
    left_out = [i for idx in groups.values() for i in idx if i not in keep]
    for i in left_out:
        plan.sides[i] = "unused"
    return len(left_out)


# ------------------------------------------------------------------------------------------- the built run
@dataclass(frozen=True)
class LoopConfig:
    """All the engine reads of a recipe (it reads no recipe): the schedule of epochs and validations, what a step
    does besides the loss, what `best` means, where progress goes."""

    epochs: int
    seed: int
    batch_size: int
    mixup: float  # Beta(a, a) of mixup; 0 = off
    clip_grad_norm: float | None
    ema: float | None  # the decay of the weights' moving average; None = off
    freeze_bn: bool  # the backbone's batch norm keeps its statistics (train.finetune)
    freeze_epochs: int  # ... and in the first N epochs
    validate_every: int
    tta: str | None
    monitor: str
    mode: str  # max | min
    save_every: int  # numbered checkpoints every N epochs (0 = none)
    keep_last: int
    progress: bool
    tensorboard: bool
    sample_grid: int
    numbers: tuple = ()  # (task, column) of tasks cut into bands from a number: their estimate's MAE is reported
    recipe: dict = field(default_factory=dict)  # the resolved recipe as JSON values: checkpoints, TensorBoard's text

    def validates(self, epoch: int) -> bool:
        """Whether this (1-based) epoch ends with a validation: every `validate_every`, and the last."""
        return epoch % self.validate_every == 0 or epoch == self.epochs

    def validations(self, epoch: int) -> int:
        """How many validations epochs 1..epoch hold."""
        return sum(1 for e in range(1, epoch + 1) if self.validates(e))


def loop_config(recipe) -> LoopConfig:
    tr, cp, lg = recipe.train, recipe.checkpoint, recipe.logging
    numbers = tuple((t, s.column) for t, s in recipe.task_specs().items() if s.bins is not None and s.column)
    return LoopConfig(epochs=tr.epochs, seed=tr.seed, batch_size=tr.batch_size, mixup=tr.mixup,
                      clip_grad_norm=tr.clip_grad_norm, ema=tr.ema, freeze_bn=tr.finetune.freeze_bn,
                      freeze_epochs=tr.finetune.freeze_epochs, validate_every=recipe.eval.every, tta=recipe.eval.tta,
                      monitor=cp.monitor, mode=cp.mode, save_every=cp.every, keep_last=cp.keep_last,
                      progress=lg.progress, tensorboard="tensorboard" in lg.trackers, sample_grid=lg.sample_grid,
                      numbers=numbers, recipe=recipe.model_dump(mode="json"))


@dataclass
class Built:
    """Everything a run is made of, built from the recipe: no run state (epochs, best, writers) lives here."""

    loop: LoopConfig
    accelerator: object
    model: object  # prepared by Accelerate (wrapped under several processes)
    optimizer: object
    scheduler: object
    loss_fn: object
    heads: dict  # task -> framework.tasks.Head
    loaders: object  # framework.data.loaders.Loaders (datasets, sampler)
    train_loader: object  # the prepared (sharded) loaders
    val_loader: object
    image_size: tuple[int, int]
    notes: list[str]  # what was loaded into the model
    ema: object = None  # the averaged weights (train.ema), used to validate and to predict

    @property
    def eval_model(self):
        return self.ema if self.ema is not None else self.model


def task_losses(recipe, heads: dict, train_codes: dict):
    """The total loss: each task's own loss (built with its class weights) times the task's weight."""
    from framework.loss_modules import MultiTaskLoss
    from framework.losses import build_loss

    specs = recipe.task_specs()
    losses = {task: build_loss(type(h).loss_spec(specs[task], recipe.train.loss), len(h.classes),
                               [c for c in train_codes[task] if c >= 0]) for task, h in heads.items()}
    return MultiTaskLoss(heads, losses, {task: specs[task].weight for task in heads})


def build_run(recipe, plan: DataPlan, run_dir, trackers: list[str]) -> Built:
    """Accelerator, loaders, model with its heads, loss, optimizer and schedule, all prepared by Accelerate."""
    import torch
    from accelerate import Accelerator

    from framework.data.loaders import build_loaders
    from framework.backbones import resolve_inputs
    from framework.models import build_model
    from framework.optim import build_optimizer, build_scheduler, ema_copy
    from framework.tasks import build_heads, standardize_targets

    tr = recipe.train
    cpu = not torch.cuda.is_available()
    acc = Accelerator(cpu=cpu, mixed_precision="no" if cpu else tr.mixed_precision,
                      gradient_accumulation_steps=tr.grad_accum, log_with=trackers or None, project_dir=str(run_dir))
    size, mean, std = resolve_inputs(recipe)
    d = build_loaders(recipe, plan, size, main_process(), cpu)
    torch.manual_seed(tr.seed)
    heads = build_heads(recipe, plan.labels, d.train_codes)
    standardize_targets(heads, d.train_ds.labels)  # regression heads learn z-scores of the training split
    model, notes = build_model(recipe.model, {t: h.out_dim for t, h in heads.items()}, mean, std, size)
    if tr.sync_batchnorm and acc.num_processes > 1:  # same parameters and buffers: checkpoints stay interchangeable
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema = ema_copy(model) if tr.ema else None
    if recipe.model.compile:  # compiles the computation, keeps the state_dict keys
        backend = "inductor" if recipe.model.compile is True else recipe.model.compile
        model.net.forward = torch.compile(model.net.forward, backend=backend)
    loss_fn = task_losses(recipe, heads, d.train_codes)
    optimizer = build_optimizer(model, tr)
    model, optimizer, train_loader, val_loader = acc.prepare(model, optimizer, d.train_loader, d.val_loader)
    loss_fn = loss_fn.to(acc.device)  # not prepared: it has no trainable parameters to synchronise
    scheduler = build_scheduler(optimizer, tr, len(train_loader))
    return Built(loop_config(recipe), acc, model, optimizer, scheduler, loss_fn, heads, d, train_loader, val_loader, size, notes,
                 ema.to(acc.device) if ema is not None else None)
