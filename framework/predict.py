"""Inference from run folders: predict (with test-time augmentation), evaluate on labelled data, and ensembles.

Every run answers *questions*: its tasks (mask, gender, age ...), or, for a run that learnt a composite label as one
head (mask x gender x age = 18 classes), the parts of that label (its probabilities summed over the other parts).
Whenever the questions form a composite, the answer also has `composite` and `composite_index`
(index = mixed radix over the parts, e.g. mask*6 + gender*3 + age). Both ways of training therefore produce the
same prediction format, and per-task runs can be ensembled into the composite answer.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from framework.errors import Issue, RunError

CONTEST_ORDER = ["mask", "gender", "age"]


@dataclass
class LoadedRun:
    run_dir: Path
    recipe: object
    tasks: dict[str, dict]  # task -> {"classes": [...], "parts": {part: [...]} | None}
    model: torch.nn.Module
    resize: object
    checkpoint: Path
    heads: dict | None = None  # task -> framework.tasks.Head

    @property
    def name(self) -> str:
        return self.run_dir.name

    def questions(self) -> dict[str, list[str]]:
        """The questions this run answers, with their classes (parts of a composite head count separately)."""
        out = {}
        for task, info in self.tasks.items():
            if info.get("parts"):
                out.update(info["parts"])
            else:
                out[task] = info["classes"]
        return out

    def composite_order(self) -> list[str] | None:
        for info in self.tasks.values():
            if info.get("parts"):
                return list(info["parts"])
        names = list(self.questions())
        return names if len(names) > 1 else None


def load_run(path: str | Path, checkpoint: str = "best", overrides: list[str] | tuple = ()) -> LoadedRun:
    """A trained run from its folder (its best checkpoint) or from a checkpoint file inside one.

    `overrides` may move a regression task's cut points (`tasks.age.bins=[30,58]`): its bands are recomputed from
    the predicted number, without retraining. Nothing else about a trained run can be changed."""
    from framework.api import load_recipe
    from framework.engine import checkpoint as ckpt
    from framework.engine.runner import model_inputs
    from framework.models import build_model
    from framework import transforms as T

    path = Path(path)
    if path.is_file():
        ckpt_path, run_dir = path, path.parent.parent
    else:
        run_dir = path
        ckpt_path = run_dir / "checkpoints" / f"{checkpoint}.pt"
        if not ckpt_path.exists():
            ckpt_path = run_dir / "checkpoints" / "last.pt"
    if not (run_dir / "recipe.resolved.yaml").is_file() or not ckpt_path.is_file():
        raise RunError(Issue(f"{path} is not a trained run (needs recipe.resolved.yaml and checkpoints/*.pt).",
                             field="RUN", fix="give a folder made by `recipe run`, or a checkpoint inside one."))
    bad = [o for o in overrides if not (o.startswith("tasks.") and o.split("=")[0].endswith(".bins"))]
    if bad:
        raise RunError(Issue(f"--set {bad[0]}: only the bins of regression tasks can change after training.",
                             field="--set", fix="e.g. --set tasks.age.bins=[30,58]."))
    recipe = load_recipe(run_dir / "recipe.resolved.yaml", overrides).recipe
    tasks = json.loads((run_dir / "labels.json").read_text(encoding="utf-8"))
    state = ckpt.load(ckpt_path)
    if not all(isinstance(v, dict) for v in tasks.values()) or not isinstance(state.get("classes"), dict):
        raise RunError(Issue(f"{run_dir} was written by an older version of recipe (one-head layout).",
                             field="RUN", fix=f"train it again: recipe run {run_dir / 'recipe.resolved.yaml'}."))
    specs = recipe.task_specs() if all(isinstance(v, dict) for v in tasks.values()) else {}
    for task, spec in specs.items():
        if spec.kind == "regression":
            from framework.data.labels import bin_names
            tasks[task] = {**tasks[task], "classes": bin_names(spec.bins)}
        elif overrides and task in [o.split(".")[1] for o in overrides]:
            raise RunError(Issue(f"task {task!r} is {spec.kind}: its bands are fixed by training.", field="--set",
                                 fix="only regression tasks can move their cut points."))
    from framework.tasks import build_heads
    heads = build_heads(recipe, tasks, thresholds=state.get("thresholds"))
    size, mean, std = model_inputs(recipe)
    model_cfg = recipe.model.model_copy(update={"weights": None, "pretrained": False, "compile": False})
    model, _ = build_model(model_cfg, {t: h.out_dim for t, h in heads.items()}, mean, std, size)
    model.load_state_dict(state["model"])
    model.eval()
    return LoadedRun(run_dir, recipe, tasks, model, T.resize_stage(size, recipe.transforms.resize), ckpt_path, heads)


def list_images(images: str | Path | None = None, csv_file: str | Path | None = None) -> list[str]:
    """Image paths from a folder (recursive, sorted) or a CSV's `path` column (relative to the CSV)."""
    from framework.data.readers import IMAGE_EXTENSIONS

    if images is not None:
        root = Path(images)
        if not root.is_dir():
            raise RunError(Issue(f"image folder not found: {root}.", field="--images", fix="give a folder."))
        return [str(p) for p in sorted(root.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    path = Path(csv_file)
    if not path.is_file():
        raise RunError(Issue(f"CSV not found: {path}.", field="--csv", fix="give a CSV with a `path` column."))
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if "path" not in (reader.fieldnames or []):
            raise RunError(Issue(f"{path.name} has no `path` column (columns: {reader.fieldnames}).",
                                 field="--csv", fix="name the image column `path`."))
        return [str(p if Path(p).is_absolute() else path.parent / p) for p in (r["path"] for r in reader)]


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
    with open(run.run_dir / "split.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == side]
    for task, info in run.tasks.items():
        for k, part in enumerate(info.get("parts") or ()):
            for r in rows:
                r[part] = r[task].split("/")[k] if r.get(task) else ""
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


def predict_tasks(run: LoadedRun, paths: list[str], tta: str | None = None, batch_size: int = 64,
                  progress: bool = False, values: dict | None = None, boxes: list | None = None):
    """Per task head, probabilities (N_ok, classes) for the readable images; their indices; the failures.
    A `values` dict receives the predicted numbers of regression tasks (N_ok,). `boxes` (one face box or None
    per image) feed a face-cropping resize stage; images without one get the face detector's box. `tta` None
    means the run's own `eval.tta` (what its validation figures were measured with); "none" turns it off."""
    from framework.data.dataset import prepare
    from framework.models import outputs

    tta = resolve_tta(run, tta)
    rows = [{"path": p, "box": boxes[i] if boxes else None} for i, p in enumerate(paths)]
    detect = run.recipe.transforms.resize.face_margin is not None
    images, _, failures = prepare(rows, run.resize, progress=progress, desc="decode", detect=detect)
    bad = {i for i, _ in failures}
    ok = [i for i in range(len(paths)) if i not in bad]
    raw: dict[str, list] = {}
    with torch.no_grad():
        for start in range(0, len(ok), batch_size):
            batch = torch.stack([torch.from_numpy(np.ascontiguousarray(images[i])).permute(2, 0, 1)
                                 for i in ok[start:start + batch_size]])  # (N, 3, H, W) uint8
            out = outputs(run.model, batch, tta)
            probs = {t: run.heads[t].probs(v) for t, v in out.items()}
            for t, p in probs.items():
                raw.setdefault(t, []).append(p.numpy())
                if values is not None and run.heads[t].kind == "regression":
                    values.setdefault(t, []).append(run.heads[t].value(out[t]).numpy())
    task_probs = {t: np.concatenate(raw[t]) if raw.get(t) else np.zeros((0, len(info["classes"])))
                  for t, info in run.tasks.items()}
    if values is not None:
        for t in list(values):
            values[t] = np.concatenate(values[t])
    return task_probs, ok, [(paths[i], why) for i, why in failures]


def predict_proba(run: LoadedRun, paths: list[str], tta: str | None = None, batch_size: int = 64,
                  progress: bool = False, values: dict | None = None, boxes: list | None = None):
    """Per question, probabilities (N_ok, classes) for the readable images; their indices; the failures.
    A `values` dict receives the predicted numbers of regression questions."""
    task_probs, ok, failures = predict_tasks(run, paths, tta, batch_size, progress, values, boxes)
    return questions_of(run, task_probs), ok, failures


def questions_of(run: LoadedRun, task_probs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Task probabilities -> question probabilities (a composite head is split into its parts' marginals)."""
    out = {}
    for task, p in task_probs.items():
        parts = run.tasks[task].get("parts")
        if not parts:
            out[task] = p
            continue
        sizes = [len(c) for c in parts.values()]
        joint = p.reshape(len(p), *sizes)
        for axis, name in enumerate(parts):
            others = tuple(a + 1 for a in range(len(sizes)) if a != axis)
            out[name] = joint.sum(axis=others)
    return out


def composite_index(picks: dict[str, np.ndarray], order: list[str], classes: dict[str, list[str]]) -> np.ndarray:
    """index = sum(pick_i * prod(n_j for j > i)), e.g. mask*6 + gender*3 + age."""
    code = np.zeros(len(next(iter(picks.values()))), dtype=np.int64)
    for name in order:
        code = code * len(classes[name]) + picks[name]
    return code


def write_predictions(out: Path, paths: list[str], ok: list[int], probs: dict[str, np.ndarray],
                      classes: dict[str, list[str]], order: list[str] | None, with_proba: bool = False,
                      picks: dict[str, np.ndarray] | None = None, values: dict[str, np.ndarray] | None = None) -> None:
    """The prediction CSV: path, one column per question, composite and composite_index, the number of each
    regression question (`<question>_value`), optional probabilities."""
    picks = picks or {q: p.argmax(1) for q, p in probs.items()}
    values = values or {}
    header = ["path"] + list(probs)
    if order:
        header += ["composite", "composite_index"]
        comp = composite_index(picks, order, classes)
    header += [f"{q}_value" for q in values]
    if with_proba:
        header += [f"{q}:{c}" for q in probs for c in classes[q]]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for k, i in enumerate(ok):
            row = [paths[i]] + [classes[q][picks[q][k]] for q in probs]
            if order:
                row += ["/".join(classes[q][picks[q][k]] for q in order), int(comp[k])]
            row += [f"{values[q][k]:.3f}" for q in values]
            if with_proba:
                row += [f"{v:.6f}" for q in probs for v in probs[q][k]]
            w.writerow(row)


def write_failures(path: Path, failures: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        w.writerows(failures)


# ----------------------------------------------------------------------------------------------------- ensembles
def hard_vote(member_probs: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Weighted majority of the members' picks; a tie goes to the tied class with the higher weighted mean
    probability (then to the lower class index)."""
    n, c = member_probs[0].shape
    votes = np.zeros((n, c))
    for p, w in zip(member_probs, weights):
        votes[np.arange(n), p.argmax(1)] += w
    mean = soft_vote(member_probs, weights)
    top = votes.max(1, keepdims=True)
    tied = np.isclose(votes, top)
    return np.where(tied, mean, -np.inf).argmax(1)


def soft_vote(member_probs: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Weighted average of the members' probabilities (N, C)."""
    w = np.asarray(weights, dtype=float)
    return np.tensordot(w / w.sum(), np.stack(member_probs), axes=1)


def member_score(run_dir: Path, metric: str) -> float:
    """A run's best validation value of `metric` (e.g. `macro_f1`, `mask/macro_f1`) from metrics.jsonl."""
    from framework.engine.runner import _flat

    key = metric if metric.startswith("val/") else f"val/{metric}"
    values = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        flat = _flat(json.loads(line))
        if key in flat:
            values.append(flat[key])
    if not values:
        raise RunError(Issue(f"{run_dir.name} has no validation value of {key!r}.", field="--weights",
                             fix="use a metric its metrics.jsonl has, e.g. val:macro_f1."))
    return max(values)


def ensemble_weights(runs: list[LoadedRun], spec: str) -> list[float]:
    if spec == "equal":
        return [1.0] * len(runs)
    if spec.startswith("val:"):
        return [member_score(r.run_dir, spec[4:]) for r in runs]
    try:
        weights = [float(x) for x in spec.split(",")]
    except ValueError:
        weights = []
    if len(weights) != len(runs) or any(w < 0 for w in weights) or not sum(weights) > 0:
        raise RunError(Issue(f"--weights {spec!r}: expected equal, val:<metric>, or {len(runs)} non-negative numbers.",
                             field="--weights", fix="e.g. --weights 1,1,2 or --weights val:macro_f1."))
    return weights


def combine(runs: list[LoadedRun], member_probs: list[dict[str, np.ndarray]], method: str,
            weights: list[float], member_values: list[dict] | None = None):
    """Per question: the ensemble's probabilities, its picks, and the classes. Members answer the questions they
    have; a question's classes must agree across the members that answer it. When every member answering a
    question is a regression run, the ensemble averages their numbers (weighted) and bins the mean."""
    classes: dict[str, list[str]] = {}
    for r in runs:
        for q, c in r.questions().items():
            if classes.setdefault(q, c) != c:
                raise RunError(Issue(f"members disagree on the classes of {q!r}: {classes[q]} vs {c} ({r.name}).",
                                     field="RUN", fix="ensemble runs trained with the same classes."))
    probs, picks = {}, {}
    member_values = member_values or [{} for _ in runs]
    for q in classes:
        have = [(m[q], w, v.get(q), r) for m, w, v, r in zip(member_probs, weights, member_values, runs) if q in m]
        ps, ws = [p for p, *_ in have], [w for _, w, *_ in have]
        if all(v is not None for _, _, v, _ in have):  # regression members: average the number, then bin it
            mean = sum(v * w for _, w, v, _ in have) / sum(ws)
            band = torch.bucketize(torch.tensor(mean, dtype=torch.float32).contiguous(), have[0][3].heads[q].bins,
                                   right=True).numpy()
            picks[q] = band
            probs[q] = np.eye(len(classes[q]))[band]
            continue
        probs[q] = soft_vote(ps, ws)
        picks[q] = hard_vote(ps, ws) if method == "hard" else probs[q].argmax(1)
    return probs, picks, classes


def composite_order_of(runs: list[LoadedRun], questions: list[str], requested: str | None = None) -> list[str] | None:
    """The parts of the composite answer: as requested, else a composite member's, else mask/gender/age."""
    if requested:
        order = [x.strip() for x in requested.split(",")]
        missing = [q for q in order if q not in questions]
        if missing:
            raise RunError(Issue(f"--composite names {missing}, which no member answers (they answer {questions}).",
                                 field="--composite", fix="list questions the members answer."))
        return order
    for r in runs:
        order = r.composite_order()
        if order and all(q in questions for q in order):
            return order
    if all(q in questions for q in CONTEST_ORDER):
        return CONTEST_ORDER
    return None


def truth_from_splits(runs: list[LoadedRun], questions: dict[str, list[str]]):
    """If all members share one validation split: its paths and, per question, the true class index (-1 = none)."""
    sides = [{row["path"]: row for row in split_rows(r, "val")} for r in runs]
    if any(sorted(s) != sorted(sides[0]) for s in sides[1:]):
        return None
    paths = sorted(sides[0])
    truth = {}
    for q, cls in questions.items():
        rows = next((s for s in sides if q in next(iter(s.values()), {})), None)
        if rows is not None:
            truth[q] = np.array([cls.index(rows[p][q]) if rows[p][q] else -1 for p in paths])
    return paths, truth


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> float:
    from framework.engine.metrics import confusion, scores

    has = y_true >= 0
    return scores(confusion(y_true[has], y_pred[has], n), [str(i) for i in range(n)])["macro_f1"]
