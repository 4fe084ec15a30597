"""`recipe`: the command line. Each command parses, calls one framework.api function and prints; heavy imports
happen inside commands, so `recipe --help` is instant. A RecipeError becomes its one-paragraph message and exit
code in one place (`_Group.invoke`); environment defaults are set by the group (before any command imports
torch), not by importing the library."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from framework.cli_options import (load_plugins, one_source, images_options, overrides_option, plugin_option,
                                  prior_shift_option, tta_option)
from framework.cli_launch import launch
from framework.cli_search import sweep, tune
from framework.errors import RecipeError

# Set before torch or albumentations load (the entry point runs first): no phoning home, hub look-ups that fail at
# once offline, and OpenMP threads that sleep while waiting instead of spinning (two runs on one machine each
# keep near full speed; the arithmetic, and so the metrics, are unchanged).
ENVIRONMENT = {"NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}


class _Group(click.Group):
    """Shows a RecipeError (bad recipe, data, run folder) as its message, with its exit code, for every command."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RecipeError as e:
            from framework import api

            if api.main_process():  # several processes (torchrun) all fail alike: say it once
                click.echo(e.format(), err=True)
            sys.exit(e.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="recipe-framework", prog_name="recipe")
def main():
    """Train image classifiers from declarative YAML recipes."""
    for key, value in ENVIRONMENT.items():  # runs before any command imports torch
        os.environ.setdefault(key, value)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@overrides_option
@click.option("--print", "print_", is_flag=True, help="Print the fully resolved recipe and the classes.")
def validate(recipe, overrides, print_):
    """Check RECIPE and its data without training: every name, file, size and metric it uses; sources, labels,
    split, leakage. Exit 2 on errors."""
    from framework import api

    resolved = api.validate(recipe, overrides)
    for w in resolved.loaded.warnings:
        click.echo("warning: " + w.format(), err=True)
    click.echo(api.validated(recipe, resolved, full=print_))


def _run_args(recipe, overrides, name, resume, all_folds, plugins) -> list[str]:
    """The same command for every process, with one run name for all of them."""
    import datetime

    args = [recipe] if recipe else ["--resume", resume]
    if recipe and not name:
        name = f"{Path(recipe).stem}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    args += (["--name", name] if name else []) + (["--all-folds"] if all_folds else [])
    for o in overrides:
        args += ["--set", o]
    for spec in plugins:
        args += ["--plugin", spec]
    return args


@main.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@overrides_option
@click.option("--name", help="Run folder name (default: <recipe>-<date>-<time>); never overwrites a folder.")
@click.option("--resume", type=click.Path(file_okay=False), help="Continue the run in this folder.")
@click.option("--all-folds", is_flag=True, help="Train every fold of a k-fold recipe (runs NAME-fold0 ...).")
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel processes on this machine: one per GPU, or CPU processes (gloo) without one.")
@plugin_option
def run(recipe, overrides, name, resume, all_folds, processes, plugins):
    """Train RECIPE into a new run folder (or continue one with --resume RUN_DIR).

    A resumed run imports no plugin named in its folder: give the ones you trust with --plugin."""
    if bool(recipe) == bool(resume):
        raise click.UsageError("give either a RECIPE file or --resume RUN_DIR.")
    if processes > 1 and "WORLD_SIZE" not in os.environ:
        sys.exit(launch(processes, _run_args(recipe, overrides, name, resume, all_folds, plugins)))
    from framework import api

    load_plugins(plugins)

    try:
        if all_folds:
            run_dirs = api.run_all_folds(recipe, overrides, name=name, log=click.echo)
        else:
            run_dirs = [api.run(recipe, overrides, name=name, resume=resume, log=click.echo)]
    except KeyboardInterrupt:
        sys.exit(130)
    if api.main_process():  # one report, from the main process
        _report_runs(run_dirs, all_folds)


def _report_runs(run_dirs: list[Path], all_folds: bool) -> None:
    from framework import api

    for line in api.finished_runs(run_dirs, all_folds, api.run_summary):
        click.echo(line)


@main.command()
@click.argument("run", type=click.Path(exists=True))
@images_options
@click.option("--out", default="predictions.csv", show_default=True, type=click.Path(dir_okay=False))
@tta_option
@click.option("--proba", is_flag=True, help="Add each class's probability.")
@prior_shift_option
@click.option("--image-column", default="path", show_default=True, help="The --csv column naming the images.")
@click.option("--root", type=click.Path(file_okay=False), help="Folder the --csv image names are relative to "
              "(default: the CSV's folder).")
@click.option("--answer", metavar="COLUMN", help="Write the contest's submission to --out: the --csv file with "
              "COLUMN set to each image's class index, mask*6 + gender*3 + age (predictions go beside it).")
@plugin_option
def predict(run, images, csv_file, out, tta, proba, prior_shift, image_column, root, answer, plugins):
    """Predict images with RUN (a run folder: its best checkpoint; a checkpoint file; or a folder made by
    `recipe export`, run with onnxruntime and without torch)."""
    from framework import api

    load_plugins(plugins)
    source = one_source(images, csv_file)
    if csv_file and (image_column != "path" or root):
        source = api.image_list(csv_file, image_column, root)
    if answer:
        if not csv_file or proba or prior_shift or tta:
            raise click.UsageError("--answer writes the contest's submission from --csv (its info.csv), with the run's "
                                   "own choices: without --proba, --prior-shift or --tta.")
        result = api.submit(run, csv_file, out, image_column, root, answer)
    else:
        result = api.predict(run, source, out, tta, proba, prior_shift)
    click.echo(result["distribution"])
    if result["decision"]:
        click.echo(result["decision"])
    click.echo(f"wrote {result['out']}: {result['predicted']} images (class shares in "
               f"{Path(result['out']).stem}.distribution.json)")
    if result["failed"]:
        click.echo(f"{len(result['failed'])} unreadable image(s), listed in {result['failed_file']}", err=True)
    if answer:
        click.echo(f"wrote {result['submission']}: column {answer} = mask*6 + gender*3 + age (classes by index in "
                   f"{result['classes_file']})")
        if result["unanswered"]:
            click.echo(f"warning: {result['unanswered']} row(s) have no answer (unreadable images): the contest "
                       "scores every row", err=True)


@main.command()
@click.argument("run", type=click.Path(exists=True))
@click.option("--recipe-data", type=click.Path(dir_okay=False), help="A recipe whose data (all of it) is the set.")
@click.option("--csv", "csv_file", type=click.Path(dir_okay=False),
              help="A manifest: `path` plus the run's label columns.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default RUN/evaluations/<name>-<hash of its path>).")
@tta_option
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Move a regression task's cut points without retraining, e.g. --set tasks.age.bins=[30,58].")
@plugin_option
def evaluate(run, recipe_data, csv_file, out, tta, overrides, plugins):
    """Score RUN on a labelled set (default: its own validation split): per-class report, confusion matrix PNGs,
    class distribution."""
    if recipe_data and csv_file:
        raise click.UsageError("give --recipe-data FILE or --csv FILE, not both (neither: the run's validation split).")
    from framework import api

    load_plugins(plugins)
    result = api.evaluate(run, recipe_data or csv_file, out, tta, overrides)
    click.echo(result["report"])
    click.echo(f"written to {result['out']}")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default="onnx", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), help="Folder to create (default RUN/export-<format>).")
@tta_option
def export(run, fmt, out, tta):
    """Export RUN's best checkpoint as one model file (uint8 images in, normalisation inside, dynamic batch), with
    export.json and MODEL_CARD.md; checked against the run on its validation images. `recipe predict OUT` runs it."""
    from framework import api

    result = api.export(run, fmt, out, tta, log=click.echo)
    if not result["finished"]:
        src = result["source_run"]
        click.echo(f"warning: {src['name']} is not finished ({src['status']}, {src['epochs_done']} of "
                   f"{src['epochs']} epochs): exported its best checkpoint so far (epoch {src['best_epoch']}).", err=True)
    click.echo(f"wrote {result['out']}: {result['file']}, export.json, MODEL_CARD.md")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--method", type=click.Choice(["hard", "soft"]), default="soft", show_default=True)
@click.option("--weights", default="equal", show_default=True,
              help="equal, val:<metric> (each run's best validation value), or w1,w2,...")
@images_options
@click.option("--out", default="ensemble.csv", show_default=True, type=click.Path(dir_okay=False))
@click.option("--composite", help="Questions that form the composite answer, e.g. mask,gender,age.")
@tta_option
@click.option("--proba", is_flag=True)
@prior_shift_option
@plugin_option
def ensemble(runs, method, weights, images, csv_file, out, composite, tta, proba, prior_shift, plugins):
    """Combine RUNS by hard or soft voting; per-task runs combine into the composite answer."""
    from framework import api

    load_plugins(plugins)
    voting = api.voting_rule(method, weights, composite, tta, prior_shift)
    result = api.ensemble(list(runs), one_source(images, csv_file), out, voting, proba)
    for q, prior in result["estimated_priors"].items():
        click.echo(f"[{q}] test priors used: " + ", ".join(f"{v:.3f}" for v in prior))
    click.echo(f"wrote {result['out']}: {result['predicted']} images, weights {result['weights']}"
               + (f", composite = {' x '.join(result['composite'])}" if result["composite"] else ""))
    if result["decision"]:
        click.echo(result["decision"])
    if result["validation"]:
        questions = sorted({q for row in result["validation"].values() for q in row})
        click.echo("validation macro-F1 (shared split):")
        click.echo(f"  {'member':<32}" + "".join(f"{q:>12}" for q in questions))
        for name, row in result["validation"].items():
            click.echo(f"  {name:<32}" + "".join(f"{row[q]:12.4f}" if q in row else f"{'-':>12}" for q in questions))


@main.command()
@click.argument("runs", nargs=-1, type=click.Path(exists=True))
@click.option("--baseline", type=click.Path(exists=True, file_okay=False),
              help="Run the `changed` column compares with (default: the oldest).")
@click.option("--sort", "sort_key", help="Metric to sort by, best first (default: val/macro_f1).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "md", "html"]), default="table", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Write to a file instead of the terminal.")
def compare(runs, baseline, sort_key, fmt, out):
    """The experiment sheet of RUNS (run folders, folders of runs, or NAME-cv.json files of `--all-folds`; default:
    runs/). A cross-validation is one more row: its folds pooled."""
    from framework import api

    text, n, warnings = api.compare(list(runs) or ["runs"], baseline, sort_key, fmt)
    for w in warnings:
        click.echo("warning: " + w, err=True)
    if out:
        Path(out).write_text(text, encoding="utf-8")
        click.echo(f"wrote {out} ({n} runs)")
    else:
        click.echo(text, nl=False)


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the result as JSON.")
def crossval(runs, out):
    """Score the fold runs RUNS of a k-fold recipe as one validation set: every item predicted once, by the fold
    model that did not train on it (`recipe run --all-folds` prints and writes this itself)."""
    from framework import api

    click.echo(api.crossval_report(api.cross_validate(list(runs), out)))
    if out:
        click.echo(f"wrote {out}")


@main.command()
@click.argument("target", type=click.Path(exists=True))
@click.option("--out", type=click.Path(dir_okay=False), default="boxes.csv", show_default=True,
              help="The manifest to write: the images with xmin, ymin, xmax, ymax and box_from columns.")
@click.option("--detector", help="haar, mtcnn or a plugin's (default: the recipe's transforms.face_detector, "
                                 "else auto).")
@click.option("--sheet", type=click.Path(dir_okay=False), help="Also save a contact sheet of the boxes (PNG).")
@overrides_option
def faces(target, out, detector, sheet, overrides):
    """Find the face in every image of TARGET (a recipe, a folder of images or a CSV with a `path` column) and
    write the boxes as a manifest: check them, fix a few by hand, then train with the source's `box_columns`."""
    from framework import api

    result = api.faces(target, out, overrides, detector, sheet)
    c = result["counts"]
    click.echo(f"{result['images']} images: {c['data']} boxes from the data, {c['detector']} found by "
               f"{result['detector']}, {c['none']} without a face; written to {result['out']}"
               + (f" (contact sheet: {result['sheet']})" if "sheet" in result else ""))


main.add_command(sweep)  # the search commands live in cli_search
main.add_command(tune)


@main.command("inspect")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@overrides_option
@click.option("--out", type=click.Path(file_okay=False), default="inspect", show_default=True,
              help="Folder for report.txt, report.json and augmentations.png.")
def inspect_cmd(recipe, overrides, out):
    """Look at RECIPE's data without training: counts, leakage, odd files, sizes, augmentation preview."""
    from framework import api

    report = api.inspect(recipe, overrides, out)
    click.echo(api.inspect_report(report))
    click.echo(f"\nwritten to {out}/ (augmentation preview: {report['preview']})")


@main.command()
@click.argument("run", type=click.Path(exists=True))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--task", help="Explain this task only (default: every task).")
@click.option("--target", help="Explain this class (default: the predicted one).")
@click.option("--layer", help="Module name of the target layer (default: chosen automatically).")
@click.option("--out", type=click.Path(file_okay=False), default="explain", show_default=True)
@plugin_option
def explain(run, images, task, target, layer, out, plugins):
    """Grad-CAM heatmaps of RUN's model over IMAGES (files, folders, or CSVs with a `path` column and, for runs
    that crop to faces, the recipe's box columns), and a contact sheet."""
    from framework import api

    load_plugins(plugins)
    result = api.explain(run, list(images), out, task, target, layer)
    click.echo(f"wrote {len(result['files'])} heatmaps and {result['out']}/contact_sheet.png")


@main.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
def plugins(recipe):
    """List registered transforms, backbones, losses, readers, task kinds and weight sources, with where each
    came from.

    Installed packages' plugins are always listed; give a RECIPE to include the plugins it names."""
    from framework import api

    extra = {"transforms": "and every albumentations transform", "backbones": "and every timm model"}
    for kind, entries in api.registered(recipe).items():
        click.echo(f"{kind}:")
        width = max([len(n) for n, _ in entries] + [8])
        for name, origin in entries:
            click.echo(f"  {name:<{width}}  {origin}")
        if kind in extra:
            click.echo(f"  ({extra[kind]})")


@main.command()
@click.option("--out", type=click.Path(dir_okay=False), help="Write the schema to this file instead of stdout.")
def schema(out):
    """Print the recipe's JSON Schema (for editor completion and checks)."""
    import json

    from framework import api

    text = json.dumps(api.schema(), indent=2)
    if out:
        Path(out).write_text(text + "\n", encoding="utf-8")
    else:
        click.echo(text)


if __name__ == "__main__":
    main()

