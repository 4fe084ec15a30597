"""The public functions: one per command, each short, each usable without the CLI.

    import framework as rf
    resolved = rf.validate("recipes/hard_aug.yaml", ["model.backbone=resnet18"])
    run_dir = rf.run("recipes/hard_aug.yaml", ["train.epochs=3"], name="try")
    rf.predict(run_dir, "photos/", out="preds.csv")

Nothing here imports torch at module level; each function imports the layer it needs.
"""
from __future__ import annotations

import datetime as _dt
import os
import time
from pathlib import Path

from framework.errors import Interrupted, Issue, Pruned, RunError
from framework.recipe.loaded import LoadedRecipe, load_recipe
from framework import runs as run_folders
from framework.folders import RunFolder
from framework.plugins import load_plugin  # noqa: F401 - for the CLI, as what the commands print:
from framework.processes import main_process
from framework.reports import crossval_report, finished_runs, inspect_report, validated, voting_rule  # noqa: F401


def validate(path: str | Path, overrides: list[str] | tuple = ()):
    """Load the recipe and run every check that does not need training (framework.resolve): names, files,
    trackers, the monitored metric, sizes, and the data plan (sources, labels, split, leakage audit)."""
    from framework.resolve import resolve

    resolved = resolve(load_recipe(path, overrides))
    if resolved.recipe.tune is not None:  # what `recipe tune` would try, checked before trial 17
        from framework.tune.plan import check_tune

        check_tune(path, list(overrides), resolved)
    return resolved


def run(path: str | Path | None = None, overrides: list[str] | tuple = (), name: str | None = None,
        resume: str | Path | None = None, log=print, hooks: list | tuple = ()) -> Path:
    """Train a recipe into a new run folder (or continue one with `resume`); returns the run folder.
    Every check of `validate` runs first: a recipe that fails one leaves no folder behind. `hooks`: objects whose
    `after_validation(ctx)` (framework.engine.runner.EpochContext) is called after each validation; one may end
    the run by raising `framework.errors.Pruned` (the summary then says `pruned`; the exception reaches the caller)."""
    dist = run_folders.distributed()
    resolved, run_dir, state, summary = _prepare(path, overrides, name, resume, dist)
    say = log if main_process() else (lambda *_: None)
    for w in resolved.loaded.warnings:
        say("warning: " + w.format())
    dist.wait_for_everyone()
    plan = resolved.plan
    say(f"run folder: {run_dir}")
    say(_threads(resolved.recipe.train.threads))
    say("images per class (train / val): " + plan.describe())
    if plan.indices("unused"):
        say(f"left out: {len(plan.indices('unused'))} image(s) (`unused` in split.csv)")
    summary["process"] = run_folders.this_process()  # who trains it (see run_folders.member_state)
    _train(resolved, run_dir, state, summary, say, list(hooks))
    if resolved.recipe.eval.decision == "macro_f1" and main_process():
        from framework.inference import decision

        for line in decision.report_lines(decision.fit_runs([run_dir])):
            say(line)
    return run_dir


def _threads(wanted: int | None) -> str:
    """Set the training threads (train.threads) and say how many there are, and how idle ones wait."""
    import torch

    if wanted:
        torch.set_num_threads(wanted)
    return (f"threads: {torch.get_num_threads()} per process ({'train.threads' if wanted else 'the default'}; "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})")


def _prepare(path, overrides, name, resume, dist):
    """The resolved recipe, the run folder (made on the main process), the state to resume and the summary."""
    from framework.recipe.loaded import resolved_yaml
    from framework.resolve import resolve

    if resume is not None:
        run_dir = Path(resume)
        loaded, state, summary = run_folders.resume_state(run_dir, overrides)
        resolved = resolve(loaded)
        run_folders.check_same_recipe(run_dir, resolved.recipe, state)
        run_folders.check_same_split(run_dir, resolved.plan)
        if overrides and main_process():
            RunFolder(run_dir).write_recipe(resolved_yaml(loaded.recipe))
        return resolved, run_dir, state, summary
    resolved = resolve(load_recipe(path, overrides))  # validate's checks (a `tune` section is not run's concern)
    root = Path(resolved.recipe.output.root)
    run_dir = run_folders.main_decides(dist, lambda: run_folders.new_run_dir(root, Path(path).stem, name))
    summary = {"wall_seconds": 0.0}
    if main_process():
        summary = run_folders.create(run_dir, resolved, Path(path), overrides)
    return resolved, run_dir, None, summary


def _train(resolved, run_dir: Path, state, summary: dict, say, hooks: list) -> None:
    """Build, fit, and record how it ended in summary.json (finished, interrupted, failed) whatever happens."""
    from framework.build import build_run
    from framework.engine.logging import RunLog
    from framework.engine.runner import fit

    started, before = time.perf_counter(), summary.get("wall_seconds", 0.0)
    main = main_process()
    try:
        with resolved.loaded.errors_located():
            built = build_run(resolved.recipe, resolved.plan, run_dir, resolved.trackers)
            log = RunLog(built, run_dir, resolved.plan.labels, say)
            summary.update(fit(built, resolved.plan, log, summary, state, _hooks(resolved.recipe) + hooks))
        summary["status"] = "finished"
    except Pruned as e:
        summary["status"] = "pruned"
        summary["pruned"] = {"epoch": e.epoch, "why": e.why}
        raise
    except Interrupted:
        summary["status"] = "interrupted"
        raise
    except KeyboardInterrupt:
        summary["status"] = "interrupted"
        raise Interrupted(Issue(f"interrupted; the last finished epoch is saved. Continue with "
                             f"`recipe run --resume {run_dir}`.")) from None
    except BaseException as e:
        summary["status"] = "failed"
        summary["error"] = str(e).splitlines()[0][:500] if str(e) else type(e).__name__
        raise
    finally:
        summary["wall_seconds"] = round(before + time.perf_counter() - started, 2)
        summary["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
        if run_dir.exists() and main:
            try:
                RunFolder(run_dir).write_summary(summary)
            except (OSError, RunError):
                pass  # e.g. the disk is full: the error being raised says so


def _hooks(recipe) -> list:
    """What the engine calls after each validation, wired from outside (the engine imports no review code)."""
    if not recipe.logging.cam_every:
        return []
    from framework.review.explain import CamHook

    return [CamHook(recipe, recipe.logging.cam_every, recipe.logging.cam_images)]


def run_or_continue(path: str | Path, overrides: list[str] | tuple = (), name: str = "", log=print) -> Path:
    """`run` for one member of a sweep or a cross-validation, so that the same command, run again, completes
    the set: a member that finished with the same recipe is kept, one that was interrupted is resumed from its
    last saved epoch, a missing one is trained. A member folder that failed, that another process may still be
    training, or that holds another recipe stops with the fix (nothing in it is touched)."""
    decision = run_folders.main_decides(run_folders.distributed(),
                                        lambda: run_folders.member_state(path, overrides, name, _concrete))
    if decision is None:
        return run(path, overrides, name=name, log=log)
    how, run_dir = decision
    say = log if main_process() else (lambda *_: None)
    if how == "kept":
        say(f"{name}: finished earlier with the same recipe; kept ({run_dir})")
        return run_dir
    say(f"{name}: interrupted earlier; continuing from its last saved epoch")
    return run(resume=run_dir, log=log)


def _concrete(loaded: LoadedRecipe) -> None:
    """What `run` makes concrete before writing the run folder: `transforms.image_size: auto` becomes the
    backbone's own size, `face_detector: auto` the installed detector."""
    from framework.backbones import resolve_inputs
    from framework.resolve import check_face_detector

    with loaded.errors_located():
        size, _, _ = resolve_inputs(loaded.recipe)  # checks the name too
        check_face_detector(loaded.recipe)
    if loaded.recipe.transforms.image_size == "auto":
        loaded.recipe.transforms.image_size = size


def run_all_folds(path: str | Path, overrides: list[str] | tuple = (), name: str | None = None,
                  log=print) -> list[Path]:
    """Train every fold of a k-fold recipe, as runs named `<name>-fold<i>` (ready for `recipe ensemble`), then
    score them as one validation set (`<name>-cv.json`)."""
    from framework.recipe.load import issue_at

    loaded = load_recipe(path, overrides)
    policy = loaded.recipe.validation
    if policy.type != "kfold":
        raise RunError(issue_at(loaded.locs, ("validation",), f"--all-folds needs validation type kfold, not "
                                f"{policy.type!r}.", "set validation: {type: kfold, k: 5}.", str(path)))
    base = name or f"{Path(path).stem}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    fold_runs = [run_or_continue(path, list(overrides) + [f"validation.fold={k}"], name=f"{base}-fold{k}", log=log)
                 for k in range(policy.k)]
    if main_process():  # one writer when several processes train the folds
        cross_validate(fold_runs, fold_runs[0].parent / f"{base}-cv.json")
    return fold_runs


def cross_validate(fold_runs: list[str | Path], out: str | Path | None = None) -> dict:
    """Pool the kept epochs of all k fold runs into one out-of-fold score (framework.review.crossval); written to
    `out` (JSON) when given. Returns the result with `out` set."""
    from framework.io import write_json
    from framework.review import crossval

    result = crossval.pooled([Path(r) for r in fold_runs])
    if crossval.wants_decision(Path(fold_runs[0])):  # eval.decision: macro_f1, fitted on the pooled out-of-fold
        from framework.inference import decision
        result["decision"] = decision.fit_runs(fold_runs)
    if out is not None:
        write_json(Path(out), result)
        result["out"] = str(out)
    return result


def sweep(recipes: list[str | Path], grid: list[str], overrides: list[str] | tuple = (), prefix: str | None = None,
          dry_run: bool = False, log=print) -> list[dict]:
    """Every combination of the grid for each recipe, one run after another (framework.sweep). Every member is
    validated before anything trains; `dry_run` only lists them."""
    from framework.sweep import expand, run_sweep

    plan = expand(list(recipes), list(grid), prefix)
    for member in plan:
        load_recipe(member["recipe"], list(overrides) + member["overrides"])
    if dry_run:
        return plan
    return run_sweep(plan, run_or_continue, list(overrides), log=log)


def tune(path: str | Path, overrides: list[str] | tuple = (), trials: int | None = None, storage: str | None = None,
         study: str | None = None, log=print) -> dict:
    """Search the recipe's `tune:` space (framework.tune): every check of `validate` on the base recipe and on each
    value the space may give, then trials (ordinary run folders `<study>-tNNN`) until the study has `trials`,
    pruned early when the pruner says so; several processes or machines running this share the study through its
    storage. Returns the report (`tune_report`)."""
    from framework.tune.study import work

    if run_folders.distributed().num_processes > 1:
        raise RunError(Issue("a tuning worker is one process; several processes would each run the study's "
                             "trials as one.", field="--processes", fix="start `recipe tune` several times "
                             "instead (each is a worker of the same study), without --processes or torchrun."))
    from framework.tune.plan import open_plan

    plan, found = open_plan(path, overrides, trials, storage, study)
    log(f"study {plan.name} in {plan.storage}: {plan.trials_wanted()} trials by {plan.metric} "
        f"({plan.direction}), sampler {plan.spec.sampler.name}, pruner {plan.spec.pruner.name}")
    work(plan, found, run, log)
    from framework.tune.report import report

    return report(plan, found)


def tune_report(path: str | Path, overrides: list[str] | tuple = (), storage: str | None = None,
                study: str | None = None) -> dict:
    """A study's sheet of trials (also trials.csv), its best parameters and their importances, and best.yaml (a
    recipe that extends the base with the best trial's values); runs no trial. Keys: text, trials, best, ..."""
    from framework.tune.plan import open_plan
    from framework.tune.report import report

    return report(*open_plan(path, overrides, None, storage, study))


def faces(target: str | Path, out: str | Path = "boxes.csv", overrides: list[str] | tuple = (),
          detector: str | None = None, sheet: str | Path | None = None) -> dict:
    """Face boxes of a recipe's images (its detector; boxes from the data kept), a folder of images or a CSV,
    written as a manifest with box columns and `box_from` (framework.review.faces); `sheet`: a contact sheet."""
    from framework.review.faces import faces_of

    return faces_of(target, Path(out), list(overrides), detector, Path(sheet) if sheet else None)


# ------------------------------------------------------------------------------------ on trained runs
def _images(images):
    """A folder, a CSV with a `path` column, a list of image paths, or an ImageList (`image_list`), as an
    ImageList."""
    from framework.inference.run import ImageList, list_images

    if isinstance(images, ImageList):
        return images
    if isinstance(images, (list, tuple)):
        return ImageList([str(p) for p in images])
    if str(images).lower().endswith(".csv"):
        return list_images(csv_file=images)
    return list_images(images=images)


def image_list(csv_file: str | Path, column: str = "path", root: str | Path | None = None):
    """The images a CSV names in `column`, relative to `root` (default: the CSV's folder), with its rows kept."""
    from framework.inference.run import list_images

    return list_images(csv_file=csv_file, column=column, root=root)


def predict(run: str | Path, images, out: str | Path = "predictions.csv", tta: str | None = None,
            proba: bool = False, prior_shift: str | None = None) -> dict:
    """Predict `images` (a folder, a CSV with a `path` column, a list of paths, or an `image_list`) with a run's
    best checkpoint; also the class shares, and a prior shift when asked
    (framework.inference.answer.predict_images)."""
    from framework.inference.answer import predict_images

    return predict_images(run, _images(images), out, tta, proba, prior_shift)


def submit(run: str | Path, info_csv: str | Path, out: str | Path = "submission.csv", image_column: str = "ImageID",
           root: str | Path | None = None, answer: str = "ans") -> dict:
    """The contest's submission file: `info_csv` (its images in `image_column`, relative to `root`) written to
    `out` with `answer` set to each image's class index, mask*6 + gender*3 + age (framework.inference.submission);
    the predictions beside it. A run that does not answer the contest's 18 classes is refused."""
    from framework.inference.answer import submit_images

    return submit_images(run, image_list(info_csv, image_column, root), out, answer)


def export(run: str | Path, fmt: str = "onnx", out: str | Path | None = None, tta: str | None = None,
           log=print) -> dict:
    """Export a run's best checkpoint as one ONNX or TorchScript file, with export.json and MODEL_CARD.md
    (framework.inference.export); `recipe predict` runs the folder."""
    from framework.inference.export import export_run

    return export_run(run, fmt, out, tta, log)


def evaluate(run: str | Path, data: str | Path | None = None, out: str | Path | None = None,
             tta: str | None = None, overrides: list[str] | tuple = ()) -> dict:
    """Score a run on labelled data: a manifest CSV (`path` and the run's label columns), a recipe whose data is
    the set, or (None) the run's own validation split; see framework.inference.evaluate."""
    from framework.inference.evaluate import evaluate as _evaluate

    is_csv = data is not None and str(data).lower().endswith(".csv")
    return _evaluate(run, None if is_csv or data is None else data, data if is_csv else None, out, tta, overrides)


def ensemble(runs: list[str | Path], images, out: str | Path = "ensemble.csv", voting=None,
             proba: bool = False) -> dict:
    """Hard or soft voting over runs (`voting`: framework.inference.ensemble.Voting) -> one prediction CSV."""
    from framework.inference.ensemble import Voting, ensemble as _ensemble

    return _ensemble(list(runs), _images(images), out, voting or Voting(), proba)


def explain(run: str | Path, images: list[str], out: str | Path = "explain", task: str | None = None,
            target: str | None = None, layer: str | None = None) -> dict:
    """Grad-CAM overlays of a run's model over images (files, folders, CSVs) and a contact sheet."""
    from framework.review.explain import explain as _explain

    return _explain(run, list(images), out, task, target, layer)


def inspect(path: str | Path, overrides: list[str] | tuple = (), out: str | Path | None = "inspect") -> dict:
    """A recipe's data without training: counts, leakage, odd and unreadable files, sizes, augmentation preview."""
    from framework.review.inspect import inspect_recipe

    return inspect_recipe(path, overrides, out)


def compare(paths: list[str | Path] = ("runs",), baseline: str | Path | None = None, sort: str | None = None,
            fmt: str = "table") -> tuple[str, int, list[str]]:
    """The experiment sheet of run folders (and `--all-folds` cross-validations) as text, its row count, and a
    warning for each folder left out because it is damaged."""
    from framework.review.compare import damaged, damaged_crossval, find_crossvals, find_runs, render, sheet

    paths = list(paths) or ["runs"]
    found, crossvals = find_runs(paths), find_crossvals(paths)
    if not found and not crossvals:
        raise RunError(Issue(f"no run folders in {', '.join(map(str, paths))} (a run folder has summary.json).",
                             field="RUNS", fix="give run folders, or folders that hold them."))
    problems = {p: damaged(p) for p in found} | {p: damaged_crossval(p) for p in crossvals}
    warnings = [f"left out {p}: {why}" for p, why in problems.items() if why]
    found = [p for p in found if not problems[p]]
    crossvals = [p for p in crossvals if not problems[p]]
    cols, rows = sheet(found, Path(baseline) if baseline else None, sort, crossvals)
    return render(cols, rows, fmt), len(rows), warnings


def run_summary(run_dir: str | Path) -> dict:
    """A run folder's summary.json, checked (a damaged one is a located RunError)."""
    return RunFolder(run_dir).summary()


def registered(recipe: str | Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """Every registered name per kind with where it came from (after loading entry points and the recipe's
    plugins)."""
    from framework.plugins import load_entry_points
    from framework.recipe.load import load_dict
    from framework.recipe.loaded import load_plugins
    from framework.registry import REGISTRIES

    if recipe is not None:
        data, locs = load_dict(Path(recipe))
        load_plugins(data, locs, Path(recipe))
    else:
        load_entry_points()
    return {kind: [(e.name, e.origin + (f": {e.meta['help']}" if "help" in e.meta else "")) for e in reg.entries()]
            for kind, reg in REGISTRIES.items()}


def schema() -> dict:
    """The JSON Schema of recipe files as written (partial files that `extends` others), for editors and
    check-jsonschema (framework.recipe.editor)."""
    from framework.recipe.editor import editor_schema

    return editor_schema()
