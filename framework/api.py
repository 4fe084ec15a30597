"""The public functions behind the CLI: load, validate and run recipes. No torch import until `run`."""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from framework.errors import FieldError, Issue, RecipeError, RunError
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

    if resume is not None:
        run_dir = Path(resume)
        loaded, plan, state, summary = _prepare_resume(run_dir, overrides)
    else:
        loaded, plan = validate(path, overrides)
        run_dir = _new_run_dir(loaded.recipe, Path(path), name)
        state = None
    for w in loaded.warnings:
        log("warning: " + w.format())
    recipe = loaded.recipe
    with loaded.errors_located():
        from framework.models import backbone_defaults

        if recipe.transforms.image_size == "auto":  # write the concrete size, so the run folder reruns as is
            recipe.transforms.image_size = backbone_defaults(recipe.model.backbone)["input_size"]
    if state is not None and overrides:
        ckpt.atomic_write_text(run_dir / "recipe.resolved.yaml", resolved_yaml(recipe))
    if state is None:
        run_dir.mkdir(parents=True)
        (run_dir / "checkpoints").mkdir()
        ckpt.atomic_write_text(run_dir / "recipe.resolved.yaml", resolved_yaml(recipe))
        from framework.data.splits import write_split
        write_split(run_dir / "split.csv", plan)
        _write_labels(run_dir, plan.labels)
        summary = {"name": run_dir.name, "recipe": str(Path(path).resolve()), "status": "running",
                   "started": _dt.datetime.now().isoformat(timespec="seconds"), "notes": recipe.notes,
                   "backbone": recipe.model.backbone,
                   "classes": {t: lab.classes for t, lab in plan.labels.items()},
                   "counts": plan.counts(), "dropped_rows": plan.dropped, "versions": _versions(),
                   "git_commit": _git_commit(Path(path).resolve().parent), "wall_seconds": 0.0}
    log(f"run folder: {run_dir}")
    log("images per class (train / val): " + plan.describe())
    started = time.perf_counter()
    before = summary.get("wall_seconds", 0.0)
    try:
        with loaded.errors_located():
            from framework.engine.runner import fit
            summary = fit(recipe, plan, run_dir, summary, state, log)
        summary["status"] = "finished"
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
        if run_dir.exists():
            ckpt.write_json(run_dir / "summary.json", summary)
    return run_dir


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
