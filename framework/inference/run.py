"""A trained run loaded for inference: its recipe, label sets, heads and model (best checkpoint), and the data
helpers every inference command shares (image lists, face boxes, the run's own split).

Every run answers *questions*: its tasks (mask, gender, age ...), or, for a run that learnt a composite label as one
head (mask x gender x age = 18 classes), the parts of that label (its probabilities summed over the other parts).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from framework.data.labels import LabelSet
from framework.errors import Issue, RunError
from framework.folders import ExportFolder, RunFolder, paths_outside_data


@dataclass
class LoadedRun:
    run_dir: Path
    recipe: object
    labels: dict[str, LabelSet]  # task -> its classes (and a composite's parts)
    model: object  # torch.nn.Module (an exported run: its onnxruntime session or TorchScript module)
    resize: object
    checkpoint: Path
    heads: dict | None = None  # task -> framework.tasks.Head
    class_counts: dict | None = None  # per question, the training split's class counts (else read from split.csv)
    composite_counts: dict | None = None  # the same for each composite class (else read from split.csv)

    @property
    def name(self) -> str:
        return self.run_dir.name

    def questions(self) -> dict[str, list[str]]:
        """The questions this run answers, with their classes (parts of a composite head count separately)."""
        out = {}
        for task, lab in self.labels.items():
            out.update(lab.parts or {task: lab.classes})
        return out

    def forward(self, batch: np.ndarray, tta: str | None) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """Task -> (probabilities (N, C), the number (N,) of a regression task, else None) for a (N, 3, H, W) uint8
        batch, with test-time augmentation `tta`."""
        import torch

        from framework.models import outputs

        with torch.no_grad():
            out = outputs(self.model, torch.from_numpy(batch), tta)
        values = {t: self.heads[t].value(v) for t, v in out.items()}
        return {t: (self.heads[t].probs(v).numpy(), None if values[t] is None else values[t].numpy())
                for t, v in out.items()}

    def composite_order(self) -> list[str] | None:
        for lab in self.labels.values():
            if lab.parts:
                return list(lab.parts)
        names = list(self.questions())
        return names if len(names) > 1 else None


def load_run(path: str | Path, checkpoint: str = "best", overrides: list[str] | tuple = ()) -> LoadedRun:
    """A trained run from its folder (its best checkpoint) or from a checkpoint file inside one.

    `overrides` may move a regression task's cut points (`tasks.age.bins=[30,58]`): its bands are recomputed from
    the predicted number, without retraining. Nothing else about a trained run can be changed."""
    from framework.engine import checkpoint as ckpt
    from framework.backbones import resolve_inputs
    from framework.models import build_model
    from framework.recipe.loaded import load_recipe
    from framework import transforms as T
    from framework.tasks import build_heads, head_class, load_head_states

    path = _not_an_export(Path(path))
    if path.is_file():
        ckpt_path, run_dir = path, path.parent.parent
    else:
        run_dir = path
        ckpt_path = RunFolder(run_dir).checkpoint(checkpoint)
        if not ckpt_path.exists():
            ckpt_path = RunFolder(run_dir).checkpoint("last")
    folder = RunFolder(run_dir)
    if not folder.is_run() or not ckpt_path.is_file():
        raise RunError(Issue(f"{path} is not a trained run (needs recipe.resolved.yaml and checkpoints/*.pt).",
                             field="RUN", fix="give a folder made by `recipe run`, or a checkpoint inside one."))
    bad = [o for o in overrides if not (o.startswith("tasks.") and o.split("=")[0].endswith(".bins"))]
    if bad:
        raise RunError(Issue(f"--set {bad[0]}: only the bins of regression tasks can change after training.",
                             field="--set", fix="e.g. --set tasks.age.bins=[30,58]."))
    recipe = load_recipe(folder.recipe_file, overrides, run_plugins=False).recipe  # (never its code)
    state = ckpt.load(ckpt_path)
    _same_model_recipe(folder, recipe, state, ckpt_path)
    if not isinstance(state.get("classes"), dict):
        raise RunError(Issue(f"{run_dir} was written by an older version of recipe (one-head layout).",
                             field="RUN", fix=f"train it again: recipe run {folder.recipe_file}."))
    labels = folder.labels(classes=state["classes"])
    folder_labels = dict(labels)
    moved = {o.split(".")[1] for o in overrides}
    for task, spec in recipe.task_specs().items():
        labels[task] = head_class(spec.kind).classes_after_training(spec) or labels[task]
        if task in moved and labels[task] is folder_labels[task]:
            raise RunError(Issue(f"task {task!r} is {spec.kind}: its bands are fixed by training.", field="--set",
                                 fix="only regression tasks can move their cut points."))
    heads = build_heads(recipe, labels)
    load_head_states(heads, state)  # thresholds, a regression head's scaling, fitted distributions
    size, mean, std = resolve_inputs(recipe)
    model_cfg = recipe.model.model_copy(update={"weights": None, "pretrained": False, "compile": False})
    model, _ = build_model(model_cfg, {t: h.out_dim for t, h in heads.items()}, mean, std, size)
    ckpt.load_for_inference(model, state, ckpt_path)
    return LoadedRun(run_dir, recipe, labels, model, T.resize_stage(size, recipe.transforms.resize), ckpt_path, heads)


def _same_model_recipe(folder: RunFolder, recipe, state: dict, ckpt_path: Path) -> None:
    """The run folder's recipe is the one the checkpoint was trained with, in everything that shapes predictions
    (model, transforms, tasks, training): an edited recipe.resolved.yaml (another image size, resize, classes) would
    predict with the wrong pipeline and say nothing. Where the data lives and how the run reports may differ."""
    from framework.recipe.loaded import NOT_THE_MODEL, edited_keys

    if not isinstance(state.get("recipe"), dict):
        return  # a checkpoint written before checkpoints carried their recipe
    keys = edited_keys(recipe.model_dump(mode="json"), state["recipe"], NOT_THE_MODEL + ("tasks.",), known_only=True)
    keys = [k for k in keys if not k.endswith(".bins")]  # (a regression task's bins move with --set)
    if keys:
        raise RunError(Issue(f"the run's recipe differs from the one {ckpt_path.name} was trained with "
                             f"({', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}).", field=keys[0],
                             file=str(folder.recipe_file),
                             fix="restore recipe.resolved.yaml from a copy of the run folder (it must not be edited; "
                                 "`--set tasks.NAME.bins=[...]` moves a regression task's bins)."))


def is_export(path: str | Path) -> bool:
    return ExportFolder(path).is_export()


def _not_an_export(path: Path) -> Path:
    if is_export(path):
        raise RunError(Issue(f"{path} is an exported model: `recipe predict` runs it; this command needs a run "
                             "folder.", field="RUN", fix=f"give the run folder it came from ({ExportFolder.INFO}: source_run)."))
    return path


@dataclass
class ImageList:
    """Images to predict: their paths, and the CSV they were listed in (whose box columns a face-cropping run
    reads), if any."""

    paths: list[str]
    csv_file: Path | None = None
    header: list[str] | None = None  # the CSV's columns and rows, as read (a submission keeps them all)
    rows: list[dict] | None = None


def list_images(images: str | Path | None = None, csv_file: str | Path | None = None, column: str = "path",
                root: str | Path | None = None) -> ImageList:
    """Image paths from a folder (recursive, sorted) or a CSV's `column` (relative to `root`, by default the CSV's
    folder; the contest's info.csv names its images in `ImageID`, relative to eval/images)."""
    from framework.data.readers import IMAGE_EXTENSIONS

    if images is not None:
        root = Path(images)
        if not root.is_dir():
            raise RunError(Issue(f"image folder not found: {root}.", field="--images", fix="give a folder."))
        return ImageList([str(p) for p in sorted(root.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS])
    path = Path(csv_file)
    if not path.is_file():
        raise RunError(Issue(f"CSV not found: {path}.", field="--csv", fix="give a CSV with a `path` column."))
    from framework.data.readers import read_table
    from framework.errors import FieldError

    try:
        header, rows = read_table(path, ())
    except FieldError as e:
        raise RunError([Issue(m, field="--csv", file=str(path), fix=f) for _, m, f in e.items]) from None
    if column not in header:
        raise RunError(Issue(f"{path.name} has no `{column}` column (columns: {header}).", field="--csv",
                             file=str(path), fix="name the image column with --image-column NAME (e.g. ImageID), "
                                                 "or call it `path`."))
    base = Path(root) if root is not None else path.parent
    if root is not None and not base.is_dir():
        raise RunError(Issue(f"image folder not found: {base}.", field="--root", fix="give the folder the CSV's image "
                             "names are relative to (the contest's eval/images)."))
    names = [r[column] or "" for r in rows]
    empty = [i + 2 for i, n in enumerate(names) if not n.strip()]
    if empty:
        raise RunError(Issue(f"line {empty[0]} has no image in column `{column}`.", field="--csv", file=str(path),
                             fix="give every row an image name."))
    return ImageList([str(p if Path(p).is_absolute() else base / p) for p in names], path, header, rows)


def face_boxes(run: LoadedRun, csv_file: str | Path | None) -> list | None:
    """Face boxes for a prediction CSV, when the run crops to faces (`transforms.resize.face_margin`) and the CSV
    has the box columns its recipe's sources name; None otherwise (the detector then finds the faces)."""
    if csv_file is None or run.recipe.transforms.resize.face_margin is None:
        return None
    from framework.data.readers import row_box

    with open(csv_file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = box_columns_in(run, reader.fieldnames or [])
        return [row_box(r, columns) for r in reader] if columns else None


def box_columns_in(run: LoadedRun, header) -> list[str] | None:
    """The box columns named by one of the run's sources that a CSV with this header has (None: none of them)."""
    names = [getattr(s, "box_columns", None) for s in run.recipe.data.sources]
    return next((c for c in names if c and set(c) <= set(header)), None)


def split_rows(run: LoadedRun, side: str) -> list[dict]:
    """The rows of the run's split.csv on one side ("train" or "val"), each with every question's class name
    (empty where the image has none): a composite label such as "wear/male/<30" is read into its parts."""
    folder = RunFolder(run.run_dir)
    rows = folder.split_rows(side, tasks=list(run.labels))
    outside = paths_outside_data([r["path"] for r in rows], run.recipe.data)
    if outside:
        raise RunError(Issue(f"{outside[0]!r} (and {len(outside) - 1} more) is not an image of the run's data "
                             f"(outside data.root {run.recipe.data.root}, and no source lists it).", field="path",
                             file=str(folder.file(folder.SPLIT)),
                             fix="restore split.csv from a copy of the run folder (it must not be edited)."))
    for task, lab in run.labels.items():
        if lab.parts:
            for r in rows:
                r.update(lab.part_names(r[task]) if r.get(task) else dict.fromkeys(lab.parts, ""))
    return rows


def resolve_tta(run: LoadedRun, tta: str | None) -> str | None:
    """The test-time augmentation in effect: None = the run's own `eval.tta`; "none" = off (returned as None)."""
    if tta is None:
        tta = run.recipe.eval.tta
    return None if tta in (None, "none") else tta


def data_boxes(run: LoadedRun) -> dict:
    """Face boxes of the run's own data, by resolved path: the boxes its training and validation cropped with
    (images of its sets need no detector). Empty when the data has moved (the detector then finds the faces)."""
    from framework.data.readers import read_sources
    from framework.errors import RecipeError

    try:
        rows = read_sources(run.recipe.data)
    except RecipeError:
        return {}
    return {str(Path(r["path"]).resolve()): r["box"] for r in rows if r.get("box")}


def run_boxes(run: LoadedRun, paths: list[str]) -> list | None:
    """The face boxes the run's own data gives these images, when the run crops to faces (None when it does not):
    the images of its validation split are then cropped as they were in validation."""
    if run.recipe.transforms.resize.face_margin is None:
        return None
    known = data_boxes(run)
    return [known.get(str(Path(p).resolve())) for p in paths]
