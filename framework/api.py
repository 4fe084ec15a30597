"""The public functions behind the CLI: load, validate and run recipes. No torch import until `run`."""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from framework.errors import FieldError, Interrupted, Issue, RecipeError, RunError
from framework.recipe.load import issue_at, load_dict
from framework.recipe.schema import Recipe
from framework.recipe.validate import validate_data


@dataclass
class LoadedRecipe:
    """A validated recipe with where each of its values was written, and lint warnings."""

    recipe: Recipe
    path: Path
    locs: dict
    warnings: list[Issue] = field(default_factory=list)

    def located(self, err: FieldError) -> RecipeError:
        return err.kind([issue_at(self.locs, p, m, f, str(self.path)) for p, m, f in err.items])

    @contextlib.contextmanager
    def errors_located(self):
        """Turn builders' FieldErrors into RecipeErrors that name file and line."""
        try:
            yield
        except FieldError as e:
            raise self.located(e) from None


def load_recipe(path: str | Path, overrides: list[str] | tuple = ()) -> LoadedRecipe:
    """Read, merge (extends, --set), validate the schema and every augmentation's arguments."""
    from framework import transforms as T

    path = Path(path)
    data, locs = load_dict(path, list(overrides))
    load_plugins(data, locs, path)
    loaded = LoadedRecipe(validate_data(data, locs, str(path)), path, locs)
    with loaded.errors_located():
        augs = T.build_augmentations(loaded.recipe.transforms)
    size = T.image_size_of(loaded.recipe.transforms)
    loaded.warnings += [issue_at(locs, p, m, f, str(path)) for p, m, f in T.lint(augs, size)]
    return loaded


def load_plugins(data: dict, locs: dict, path: Path) -> None:
    """Installed packages' plugins, then those the recipe names (before validation: they add valid names)."""
    from framework.plugins import load_entry_points, load_plugin

    load_entry_points()
    specs = data.get("plugins") or []
    if not isinstance(specs, list):
        return  # the schema reports the wrong type
    for i, spec in enumerate(specs):
        if isinstance(spec, str):
            load_plugin(spec, issue_at(locs, ("plugins", i), "", "", str(path)))


def registered(recipe: str | Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """Every registered name per kind with where it came from (after loading entry points and the recipe's
    plugins)."""
    from framework.plugins import load_entry_points
    from framework.registry import REGISTRIES

    if recipe is not None:
        data, locs = load_dict(Path(recipe))
        load_plugins(data, locs, Path(recipe))
    else:
        load_entry_points()
    return {kind: [(e.name, e.origin) for e in reg.entries()] for kind, reg in REGISTRIES.items()}


def validate(path: str | Path, overrides: list[str] | tuple = ()):
    """Load the recipe and build its data plan (sources, labels, split, leakage audit); no images decoded."""
    from framework.build import build_data

    loaded = load_recipe(path, overrides)
    with loaded.errors_located():
        plan = build_data(loaded.recipe)
    if plan.dropped:
        loaded.warnings.append(issue_at(loaded.locs, ("data", "missing_label"),
                                        f"{plan.dropped} row(s) without a label were dropped.", "", str(path)))
    for train_file, val_file in plan.duplicates[:5]:
        loaded.warnings.append(Issue(f"byte-identical files on both sides of the split: {train_file} and "
                                     f"{val_file}.", field="validation", file=str(path),
                                     fix="give duplicates the same group id."))
    if len(plan.duplicates) > 5:
        loaded.warnings.append(Issue(f"... {len(plan.duplicates) - 5} more byte-identical pairs.", file=str(path)))
    return loaded, plan


def resolved_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(json.loads(recipe.model_dump_json()), sort_keys=False, allow_unicode=True)


def _new_run_dir(recipe: Recipe, path: Path, name: str | None) -> Path:
    root = Path(recipe.output.root)
    if name:
        run_dir = root / name
        if run_dir.exists():
            raise RunError(Issue(f"run folder {run_dir} already exists.", field="--name",
                                 fix=f"choose another --name, or continue it with `recipe run --resume {run_dir}`."))
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = root / f"{path.stem}-{stamp}"
        n = 2
        while run_dir.exists():
            run_dir = root / f"{path.stem}-{stamp}-{n}"
            n += 1
    return run_dir


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "timm", "albumentations", "accelerate", "pydantic"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if out.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _write_labels(run_dir: Path, labels: dict) -> None:
    from framework.engine.checkpoint import write_json

    write_json(run_dir / "labels.json", {task: {"classes": lab.classes, "parts": lab.parts, "formula": lab.formula}
                                         for task, lab in labels.items()})


def _read_split(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(r["path"], r["split"]) for r in csv.DictReader(f)]


def run(path: str | Path | None = None, overrides: list[str] | tuple = (), name: str | None = None,
        resume: str | Path | None = None, log=print) -> Path:
    """Train a recipe into a new run folder (or continue one with `resume`); returns the run folder."""
    from framework.engine import checkpoint as ckpt

    dist = _distributed()
    if resume is not None:
        run_dir = Path(resume)
        loaded, plan, state, summary = _prepare_resume(run_dir, overrides)
    else:
        loaded, plan = validate(path, overrides)
        _concrete_image_size(loaded)  # (an unknown backbone stops here, before a run folder is made)
        run_dir, problem = None, None
        if dist.is_main_process:
            try:
                run_dir = _new_run_dir(loaded.recipe, Path(path), name)
            except RunError as e:
                problem = e
        if dist.num_processes > 1:  # every process uses the folder the main process chose (or stops with it)
            from accelerate.utils import broadcast_object_list
            run_dir, problem = broadcast_object_list([run_dir, problem])
        if problem is not None:
            raise problem
        state = None
    if not dist.is_main_process:
        log = _silent
    for w in loaded.warnings:
        log("warning: " + w.format())
    recipe = loaded.recipe
    if state is not None and overrides:
        ckpt.atomic_write_text(run_dir / "recipe.resolved.yaml", resolved_yaml(recipe))
    if state is None and dist.is_main_process:
        run_dir.mkdir(parents=True)
        (run_dir / "checkpoints").mkdir()
        ckpt.atomic_write_text(run_dir / "recipe.resolved.yaml", resolved_yaml(recipe))
        from framework.data.splits import write_split
        write_split(run_dir / "split.csv", plan)
        _write_labels(run_dir, plan.labels)
        summary = {"name": run_dir.name, "recipe": str(Path(path).resolve()), "status": "running",
                   "started": _dt.datetime.now().isoformat(timespec="seconds"), "notes": recipe.notes,
                   "overrides": list(overrides),
                   "backbone": recipe.model.backbone,
                   "classes": {t: lab.classes for t, lab in plan.labels.items()},
                   "counts": plan.counts(), "dropped_rows": plan.dropped, "unused_rows": len(plan.indices("unused")),
                   "versions": _versions(),
                   "git_commit": _git_commit(Path(path).resolve().parent), "wall_seconds": 0.0}
    elif state is None:
        summary = {"wall_seconds": 0.0}
    dist.wait_for_everyone()
    log(f"run folder: {run_dir}")
    log("images per class (train / val): " + plan.describe())
    if plan.indices("unused"):
        log(f"left out: {len(plan.indices('unused'))} image(s) of train_only sources whose group is in validation")
    summary["process"] = {"host": platform.node(), "pid": os.getpid()}  # who trains it (see _member_state)
    started = time.perf_counter()
    before = summary.get("wall_seconds", 0.0)
    try:
        with loaded.errors_located():
            from framework.engine.runner import fit
            summary = fit(recipe, plan, run_dir, summary, state, log)
        summary["status"] = "finished"
    except Interrupted:
        summary["status"] = "interrupted"
        raise
    except KeyboardInterrupt:
        summary["status"] = "interrupted"
        raise RunError(Issue(f"interrupted; the last finished epoch is saved. Continue with "
                             f"`recipe run --resume {run_dir}`.")) from None
    except BaseException as e:
        summary["status"] = "failed"
        summary["error"] = str(e).splitlines()[0][:500] if str(e) else type(e).__name__
        raise
    finally:
        summary["wall_seconds"] = round(before + time.perf_counter() - started, 2)
        summary["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
        if run_dir.exists() and dist.is_main_process:
            try:
                ckpt.write_json(run_dir / "summary.json", summary)
            except (OSError, RunError):
                pass  # e.g. the disk is full: the error being raised says so
    return run_dir


def _concrete_image_size(loaded: LoadedRecipe) -> None:
    """`transforms.image_size: auto` becomes the backbone's own size, so that the run folder reruns as is."""
    from framework.models import backbone_defaults

    with loaded.errors_located():
        size = backbone_defaults(loaded.recipe.model.backbone)["input_size"]  # checks the name too
        if loaded.recipe.transforms.image_size == "auto":
            loaded.recipe.transforms.image_size = size


def run_or_continue(path: str | Path, overrides: list[str] | tuple = (), name: str = "", log=print) -> Path:
    """`run` for one member of a sweep or a cross-validation, so that the same command, run again, completes
    the set: a member that finished with the same recipe is kept, one that was interrupted is resumed from its
    last saved epoch, a missing one is trained. A member folder that failed, that another process may still be
    training, or that holds another recipe stops with the fix (nothing in it is touched)."""
    dist = _distributed()
    decision = None
    if dist.is_main_process:
        try:
            decision = _member_state(path, overrides, name)
        except RunError as e:
            decision = e
    if dist.num_processes > 1:  # every process acts on the main process's reading of the folder
        from accelerate.utils import broadcast_object_list
        decision, = broadcast_object_list([decision])
    if isinstance(decision, RunError):
        raise decision
    if decision is None:
        return run(path, overrides, name=name, log=log)
    how, run_dir = decision
    if not dist.is_main_process:
        log = _silent
    if how == "kept":
        log(f"{name}: finished earlier with the same recipe; kept ({run_dir})")
        return run_dir
    log(f"{name}: interrupted earlier; continuing from its last saved epoch")
    return run(resume=run_dir, log=log)


def _member_state(path, overrides, name: str) -> tuple[str, Path] | None:
    """None: no folder yet; ("kept", dir): finished with this recipe; ("resume", dir): interrupted with it."""
    loaded = load_recipe(path, overrides)
    run_dir = Path(loaded.recipe.output.root) / name
    if not run_dir.exists():
        return None
    again = f"remove {run_dir} to train it again, or choose another --name"
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        before = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        raise RunError(Issue(f"run folder {run_dir} already exists, and is not a readable run folder.",
                             field="--name", fix=f"{again}.")) from None
    _concrete_image_size(loaded)  # as `run` writes it
    if before != yaml.safe_load(resolved_yaml(loaded.recipe)):
        raise RunError(Issue(f"run folder {run_dir} already exists and was trained with another recipe.",
                             field="--name", fix=f"{again} (`recipe compare` shows what changed)."))
    status = summary.get("status")
    if status == "running" and _process_gone(summary.get("process")):
        status = "interrupted"  # killed (out of memory, SIGKILL, a lost session) before it could say so
    if status == "finished":
        return "kept", run_dir
    if status == "interrupted" and (run_dir / "checkpoints" / "last.pt").is_file():
        return "resume", run_dir
    if status == "failed":
        why = f"it failed earlier ({summary.get('error', 'no error recorded')})"
    elif status == "running":
        why = ("its summary says it is still running, and its process may be training it (on another machine, "
               f"or here as pid {(summary.get('process') or {}).get('pid', '?')}); if it is not, continue it with "
               f"`recipe run --resume {run_dir}`")
    else:
        why = "it stopped before its first epoch ended"
    raise RunError(Issue(f"run folder {run_dir} already exists: {why}.", field="--name", fix=f"{again}."))


def _process_gone(process: dict | None) -> bool:
    """Whether the process a run's summary names (host, pid) has ended, as far as this machine can tell."""
    if not process or process.get("host") != platform.node():
        return False  # another machine's (or an older run's) process: cannot tell
    try:
        os.kill(int(process["pid"]), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, KeyError):
        return False
    return False


def run_all_folds(path: str | Path, overrides: list[str] | tuple = (), name: str | None = None, log=print) -> list[Path]:
    """Train every fold of a k-fold recipe, as runs named `<name>-fold<i>` (ready for `recipe ensemble`)."""
    loaded = load_recipe(path, overrides)
    policy = loaded.recipe.validation
    if policy.type != "kfold":
        raise RunError(issue_at(loaded.locs, ("validation",), f"--all-folds needs validation type kfold, not "
                                f"{policy.type!r}.", "set validation: {type: kfold, k: 5}.", str(path)))
    base = name or f"{Path(path).stem}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    runs = [run_or_continue(path, list(overrides) + [f"validation.fold={k}"], name=f"{base}-fold{k}", log=log)
            for k in range(policy.k)]
    if os.environ.get("RANK", "0") == "0":  # one writer when several processes train the folds
        cross_validate(runs, runs[0].parent / f"{base}-cv.json")
    return runs


def cross_validate(runs: list[str | Path], out: str | Path | None = None) -> dict:
    """Pool the kept epochs of all k fold runs into one out-of-fold score (framework.crossval); written to `out`
    (JSON) when given. Returns the result with `out` set."""
    from framework import crossval
    from framework.engine.checkpoint import write_json

    result = crossval.pooled([Path(r) for r in runs])
    if out is not None:
        write_json(Path(out), result)
        result["out"] = str(out)
    return result


def _silent(*_args) -> None:
    """Log sink of the non-main processes: only the main process prints."""


def _distributed():
    """Accelerate's process state when several processes run (torchrun / accelerate launch), else a stand-in.

    Without a GPU, Accelerate must be told to use the CPU, or each process trains alone on all the data."""
    import os
    from types import SimpleNamespace

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState

        return PartialState(cpu=not torch.cuda.is_available())
    return SimpleNamespace(is_main_process=True, num_processes=1, wait_for_everyone=lambda: None)


def _prepare_resume(run_dir: Path, overrides):
    from framework.build import build_data
    from framework.engine import checkpoint as ckpt

    resolved, last = run_dir / "recipe.resolved.yaml", run_dir / "checkpoints" / "last.pt"
    if not resolved.is_file():
        raise RunError(Issue(f"{run_dir} is not a run folder (no recipe.resolved.yaml).", field="--resume",
                             fix="give the folder that `recipe run` created."))
    if not last.is_file():
        raise RunError(Issue(f"{run_dir} has no checkpoint yet (checkpoints/last.pt): it stopped before the "
                             "first epoch ended.", field="--resume", fix="start it again with `recipe run`."))
    bad = [o for o in overrides if not o.startswith("train.epochs=")]
    if bad:
        raise RunError(Issue(f"--set {bad[0]} cannot change a run that is resumed (it would no longer be the "
                             "same experiment); only train.epochs can be raised.", field="--set",
                             fix="start a new run with the change instead."))
    loaded = load_recipe(resolved, overrides)
    with loaded.errors_located():
        plan = build_data(loaded.recipe)
    if [(r["path"], s) for r, s in zip(plan.rows, plan.sides)] != _read_split(run_dir / "split.csv"):
        raise RunError(Issue("the data or its split changed since this run started (split.csv differs).",
                             field="--resume", file=str(run_dir / "split.csv"),
                             fix="restore the data, or start a new run."))
    try:
        state = ckpt.load(last)
    except Exception as e:
        raise RunError(Issue(f"cannot read {last}: {e}.", field="--resume",
                             fix="restore the file, or resume from a numbered checkpoint copied to last.pt."))
    if state["epoch"] >= loaded.recipe.train.epochs:
        raise RunError(Issue(f"{run_dir.name} already finished its {loaded.recipe.train.epochs} epochs.",
                             field="--resume", fix="raise them with --set train.epochs=N to train longer."))
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    summary.update(status="running", resumed_at_epoch=state["epoch"])
    return loaded, plan, state, summary


# ------------------------------------------------------------------------------------- inference on trained runs
def predict(run: str | Path, images: str | Path | None = None, csv_file: str | Path | None = None,
            out: str | Path = "predictions.csv", tta: str | None = None, proba: bool = False,
            progress: bool = True, prior_shift: str | None = None) -> dict:
    """Predict every image with a run's own evaluation transform; unreadable images are listed, not fatal.

    Also writes `<out>.distribution.json`: per question, the class shares of the training split and of the
    predictions; with `prior_shift` ("em" or a JSON file of priors) the probabilities are re-weighted to the
    estimated (or given) test priors before classes are chosen."""
    import numpy as np

    from framework import predict as P
    from framework import priors as PS
    from framework.engine.checkpoint import write_json

    loaded = P.load_run(run)
    paths = P.list_images(images, csv_file)
    values: dict = {}
    probs, ok, failures = P.predict_proba(loaded, paths, tta, progress=progress, values=values,
                                          boxes=P.face_boxes(loaded, csv_file))
    classes = loaded.questions()
    train = {q: np.array(list(c.values()), float) / max(1, sum(c.values())) for q, c in PS.train_counts(loaded).items()}
    estimated = adjusted = None
    if prior_shift:
        adjusted, estimated = PS.shift(probs, prior_shift, classes, PS.calibration(loaded, tta))
    final = adjusted or probs
    order = loaded.composite_order()
    composite = PS.composite_shares(loaded, {q: p.argmax(1) for q, p in final.items()}, order) if order and ok else None
    table, shares = PS.distribution_table(classes, train, probs, estimated, adjusted, composite)
    out = Path(out)
    P.write_predictions(out, paths, ok, final, classes, order, proba, values=values)
    write_json(out.with_name(out.stem + ".distribution.json"), {"images": len(ok), "prior_shift": prior_shift,
                                                                 "shares": shares})
    failed_file = out.with_name(out.stem + ".failed.csv")
    if failures:
        P.write_failures(failed_file, failures)
    return {"out": out, "predicted": len(ok), "failed": failures, "failed_file": failed_file if failures else None,
            "distribution": table, "shares": shares}


def _labelled_rows(run, recipe_data: str | Path | None, csv_file: str | Path | None):
    """Rows of a labelled set, labelled with the run's own task definitions and classes."""
    from framework.data.labels import assign_tasks
    from framework.data.readers import read_sources
    from framework.recipe.schema import DataSection

    if recipe_data is not None:
        other = load_recipe(recipe_data)
        data_cfg, where = other.recipe.data, other
    else:
        csv_path = Path(csv_file).resolve()
        from framework.predict import box_columns_in

        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            boxes = box_columns_in(run, next(csv.reader(f), []))  # the face boxes a face-cropping run needs
        data_cfg = DataSection(root=str(csv_path.parent), sources=[{"type": "csv", "name": "eval",
                                                                    "manifest": csv_path.name, "box_columns": boxes}])
        where = None
    specs = {}
    for task, spec in run.recipe.task_specs().items():
        info = run.tasks[task]
        if spec.composite:
            parts = {p: s.model_copy(update={"classes": info["parts"][p]}) for p, s in spec.composite.items()}
            specs[task] = spec.model_copy(update={"composite": parts})
        else:
            specs[task] = spec.model_copy(update={"classes": info["classes"]})
    try:
        rows, outside = _within_classes(read_sources(data_cfg), specs)
        return (*assign_tasks(rows, specs, "drop", named=run.recipe.tasks is not None), outside)
    except FieldError as e:
        if where is not None:
            raise where.located(e) from None
        raise RunError([Issue(m, field=".".join(map(str, p)), file=str(csv_file), fix=f) for p, m, f in e.items]) from None


def _within_classes(rows: list[dict], specs: dict) -> tuple[list[dict], dict[str, int]]:
    """Rows whose labels are classes the run knows, and how many images of each other label were left out (a
    two-class model scored on a three-class set is scored on the two classes it has)."""
    from framework.data.labels import label_value

    outside: dict[str, int] = {}
    keep = []
    plain = [s for s in specs.values() if s.composite is None and s.bins is None and s.classes]
    for r in rows:
        unknown = None
        for spec in plain:
            value = label_value(r, spec, (), lenient=True)
            if value is not None and value not in spec.classes:
                unknown = value
        if unknown is None:
            keep.append(r)
        else:
            outside[unknown] = outside.get(unknown, 0) + 1
    return keep, outside


def evaluate(run: str | Path, recipe_data: str | Path | None = None, csv_file: str | Path | None = None,
             out: str | Path | None = None, tta: str | None = None, progress: bool = True,
             overrides: list[str] | tuple = ()) -> dict:
    """Metrics of a trained run on a labelled set (data it may never have seen): per-task report, confusion
    matrix PNGs and the predicted vs true class distribution, written to `out`."""
    import numpy as np
    from PIL import Image

    from framework import predict as P
    from framework.engine.checkpoint import write_json
    from framework.engine.metrics import format_report
    from framework.engine.runner import summarize
    from framework.engine.tb import confusion_image

    loaded = P.load_run(run, overrides=overrides)
    rows, ys, labels, dropped, outside = _labelled_rows(loaded, recipe_data, csv_file)
    paths = [r["path"] for r in rows]
    task_probs, ok, failures = P.predict_tasks(loaded, paths, tta, progress=progress,
                                               boxes=[r.get("box") for r in rows])
    y_true = np.array([[ys[t][i] for t in loaded.tasks] for i in ok]).reshape(len(ok), len(loaded.tasks))
    y_pred = np.stack([task_probs[t].argmax(1) for t in loaded.tasks], axis=1)
    result = summarize(y_true, y_pred, labels)
    name = Path(recipe_data or csv_file).stem
    out = Path(out) if out else loaded.run_dir / "evaluations" / name
    out.mkdir(parents=True, exist_ok=True)
    parts = {t: result["tasks"][t] for t in loaded.tasks} if "tasks" in result else {next(iter(loaded.tasks)): result}
    if "composite" in result:
        parts["composite"] = result["composite"]
    report = [f"{loaded.name} on {name}: {len(ok)} images ({len(failures)} unreadable, {dropped} without labels)"]
    if outside:
        report.append("left out, not classes of this run: " + ", ".join(f"{v} {n}" for v, n in outside.items()))
    distribution = {}
    for task, sc in parts.items():
        Image.fromarray(confusion_image(sc["confusion"], list(sc["per_class"]))).save(out / f"confusion_{task}.png")
        cm = np.asarray(sc["confusion"])
        distribution[task] = {c: {"true": int(cm[k].sum()), "predicted": int(cm[:, k].sum())}
                              for k, c in enumerate(sc["per_class"])}
        report += ["", f"[{task}] accuracy {sc['accuracy']:.4f}  macro-F1 {sc['macro_f1']:.4f}", format_report(sc),
                   "class distribution (true -> predicted): " + ", ".join(
                       f"{c} {d['true']}->{d['predicted']}" for c, d in distribution[task].items())]
    probs = P.questions_of(loaded, task_probs)
    prior_report = _prior_report(loaded, probs, _question_truth(loaded, ys, ok), tta)
    for q, r in prior_report.items():
        report += [f"[{q}] test priors: true {_fmt(r['true'])}, training {_fmt(r['train'])} (L1 {r['l1_train']:.3f}), "
                   f"EM estimate {_fmt(r['estimated'])} (L1 {r['l1_estimated']:.3f}); macro-F1 {r['macro_f1']:.4f} -> "
                   f"{r['macro_f1_shifted']:.4f}, accuracy {r['accuracy']:.4f} -> {r['accuracy_shifted']:.4f}, "
                   f"log-loss {r['log_loss']:.3f} -> {r['log_loss_shifted']:.3f} after re-weighting to the estimate"]
    (out / "report.txt").write_text("\n".join(report) + "\n", encoding="utf-8")
    write_json(out / "metrics.json", {"run": str(loaded.run_dir), "data": str(recipe_data or csv_file),
                                      "images": len(ok), "unreadable": failures, "unlabelled_dropped": dropped,
                                      "metrics": result, "distribution": distribution, "prior_shift": prior_report})
    P.write_predictions(out / "predictions.csv", paths, ok, probs, loaded.questions(), loaded.composite_order())
    return {"out": out, "report": "\n".join(report), "metrics": result}


def _question_truth(run, ys: dict, ok: list[int]) -> dict:
    """Per question, the true class index of each readable image (-1 = no label); composite heads are split."""
    import numpy as np

    truth = {}
    for task, info in run.tasks.items():
        codes = np.array([ys[task][i] for i in ok])
        parts = info.get("parts")
        if not parts:
            truth[task] = codes
            continue
        sizes = [len(c) for c in parts.values()]
        rest = codes.copy()
        for k in range(len(sizes) - 1, -1, -1):
            truth[list(parts)[k]] = np.where(codes >= 0, rest % sizes[k], -1)
            rest = rest // sizes[k]
    return truth


def _fmt(shares: dict) -> str:
    return "/".join(f"{v:.2f}" for v in shares.values())


def _prior_report(run, probs: dict, truth: dict, tta: str | None = None) -> dict:
    """How far the EM estimate of the test priors lands from the true ones (and the training priors), and what
    re-weighting does to macro-F1 - on labelled data, where the truth is known."""
    import numpy as np

    from framework import predict as P
    from framework import priors as PS

    classes, counts, out = run.questions(), PS.train_counts(run), {}
    moved = {t for t, s in run.recipe.task_specs().items() if s.kind == "regression"}  # bands may differ from training
    calib = PS.calibration(run, tta) if set(probs) - moved else {}
    for q, p in probs.items():
        has = truth[q] >= 0
        if not has.any() or q not in calib or q in moved:
            continue
        n = len(classes[q])
        true = np.bincount(truth[q][has], minlength=n) / has.sum()
        train = np.array(list(counts[q].values()), float) / max(1, sum(counts[q].values()))
        c = calib[q]
        estimate, adjusted, _ = PS.em_priors(PS.calibrate(p[has], c["temperature"], c["bias"]), np.array(c["prior"]))
        names = classes[q]
        out[q] = {"true": dict(zip(names, true.tolist())), "train": dict(zip(names, train.tolist())),
                  "estimated": dict(zip(names, estimate.tolist())),
                  "calibration": c,
                  "l1_train": float(np.abs(train - true).sum()), "l1_estimated": float(np.abs(estimate - true).sum()),
                  "macro_f1": P.macro_f1(truth[q][has], p[has].argmax(1), n),
                  "macro_f1_shifted": P.macro_f1(truth[q][has], adjusted.argmax(1), n),
                  "accuracy": float((p[has].argmax(1) == truth[q][has]).mean()),
                  "accuracy_shifted": float((adjusted.argmax(1) == truth[q][has]).mean()),
                  "log_loss": _log_loss(p[has], truth[q][has]), "log_loss_shifted": _log_loss(adjusted, truth[q][has])}
    return out


def _log_loss(probs, truth) -> float:
    """Mean negative log-probability of the true class (the quality of the probabilities, not only of the argmax)."""
    import numpy as np

    return float(-np.log(np.clip(probs[np.arange(len(truth)), truth], 1e-12, None)).mean())


def ensemble(runs: list[str | Path], method: str = "soft", weights: str = "equal", images=None, csv_file=None,
             out: str | Path = "ensemble.csv", composite: str | None = None, proba: bool = False,
             tta: str | None = None, progress: bool = True, prior_shift: str | None = None) -> dict:
    """Hard or soft voting over runs (backbones, seeds, folds, or one model per task) -> one prediction CSV.
    When the members share a validation split, each member's and the ensemble's validation macro-F1 are reported."""
    from framework import predict as P

    members = [P.load_run(r) for r in runs]
    w = P.ensemble_weights(members, weights)
    paths = P.list_images(images, csv_file)
    member_values = [{} for _ in members]
    outputs = [P.predict_proba(m, paths, tta, progress=progress, values=v) for m, v in zip(members, member_values)]
    ok = sorted(set.intersection(*(set(o[1]) for o in outputs)))
    member_probs = [{q: p[[o[1].index(i) for i in ok]] for q, p in o[0].items()} for o in outputs]
    member_values = [{q: v[[o[1].index(i) for i in ok]] for q, v in mv.items()} for mv, o in zip(member_values, outputs)]
    estimated = None
    if prior_shift:
        member_probs, estimated = _shift_members(members, member_probs, w, prior_shift, tta)
    probs, picks, classes = P.combine(members, member_probs, method, w, member_values)
    order = P.composite_order_of(members, list(classes), composite)
    out = Path(out)
    P.write_predictions(out, paths, ok, probs, classes, order, proba, picks)
    failures = sorted({f for o in outputs for f in o[2]})
    if failures:
        P.write_failures(out.with_name(out.stem + ".failed.csv"), failures)
    result = {"out": out, "predicted": len(ok), "failed": failures, "weights": w, "composite": order,
              "estimated_priors": {q: v.tolist() for q, v in (estimated or {}).items()}}
    result["validation"] = _ensemble_validation(members, method, w, classes, order, tta, progress)
    return result


def _shift_members(members, member_probs: list[dict], weights: list[float], how: str,
                   tta: str | None = None):
    """Prior shift for an ensemble: each member's probabilities calibrated on its own validation split; the test
    priors estimated once by EM on their weighted average (starting from the members' average prior), or given;
    then every member re-weighted from its own prior to them, so hard and soft voting both use them."""
    import numpy as np

    from framework import priors as PS

    calibs = [PS.calibration(m, tta) for m in members]
    classes = {q: c for m in members for q, c in m.questions().items()}
    targets = PS.known_priors(how, classes) if how != "em" else {}
    calibrated = [{q: PS.calibrate(p, c[q]["temperature"], c[q]["bias"]) if q in c else p for q, p in mp.items()}
                  for mp, c in zip(member_probs, calibs)]
    estimated = {}
    for q in classes:
        have = [(mp[q], c[q], wt) for mp, c, wt in zip(calibrated, calibs, weights) if q in mp and q in c]
        if not have or (how != "em" and q not in targets):
            continue
        wsum = sum(wt for *_, wt in have)
        if how == "em":
            mean_p = sum(p * wt for p, _, wt in have) / wsum
            mean_prior = sum(np.array(c["prior"]) * wt for _, c, wt in have) / wsum
            estimated[q], _, _ = PS.em_priors(mean_p, mean_prior)
        else:
            estimated[q] = targets[q]
    shifted = [{q: PS.adjust(p, np.array(c[q]["prior"]), estimated[q]) if q in estimated and q in c else p
                for q, p in mp.items()} for mp, c in zip(calibrated, calibs)]
    return shifted, estimated


def _ensemble_validation(members, method, weights, classes, order, tta, progress):
    """Members' and the ensemble's validation macro-F1 per question, when they share a validation split."""
    import numpy as np

    from framework import predict as P

    shared = P.truth_from_splits(members, classes)
    if shared is None:
        return None
    paths, truth = shared
    member_values = [{} for _ in members]
    outputs = [P.predict_proba(m, paths, tta, progress=progress, values=v) for m, v in zip(members, member_values)]
    ok = sorted(set.intersection(*(set(o[1]) for o in outputs)))
    member_probs = [{q: p[[o[1].index(i) for i in ok]] for q, p in o[0].items()} for o in outputs]
    member_values = [{q: v[[o[1].index(i) for i in ok]] for q, v in mv.items()} for mv, o in zip(member_values, outputs)]
    _, picks, _ = P.combine(members, member_probs, method, weights, member_values)
    table = {}
    for name, probs in [(m.name, mp) for m, mp in zip(members, member_probs)] + [("ensemble", None)]:
        row = {}
        for q, t in truth.items():
            pred = picks[q] if probs is None else (probs[q].argmax(1) if q in probs else None)
            if pred is not None:
                row[q] = P.macro_f1(t[ok], pred, len(classes[q]))
        if order and all(q in truth for q in order) and (probs is None or all(q in probs for q in order)):
            have = np.all([truth[q][ok] >= 0 for q in order], axis=0)
            if have.any():
                chosen = picks if probs is None else {q: probs[q].argmax(1) for q in order}
                n = int(np.prod([len(classes[q]) for q in order]))
                row["composite"] = P.macro_f1(P.composite_index({q: truth[q][ok] for q in order}, order, classes)[have],
                                              P.composite_index(chosen, order, classes)[have], n)
        table[name] = row
    return table
