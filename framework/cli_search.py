"""The two search commands, `recipe sweep` (a grid) and `recipe tune` (Optuna), added to the `recipe` group by
framework.cli; like every command they parse, call one framework.api function and print."""
from __future__ import annotations

import sys

import click

from framework.cli_options import overrides_option


@click.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--grid", multiple=True, metavar="KEY=V1,V2", help="A recipe key and its values (repeatable).")
@overrides_option
@click.option("--name", "prefix", help="Run name prefix (default: the recipe's file name).")
@click.option("--dry-run", is_flag=True, help="Only list the runs.")
def sweep(recipes, grid, overrides, prefix, dry_run):
    """Run every combination of the --grid values for RECIPES, then print their compare sheet."""
    from framework import api
    from framework.errors import Interrupted

    try:
        results = api.sweep(list(recipes), list(grid), overrides, prefix, dry_run, log=click.echo)
    except (Interrupted, KeyboardInterrupt) as e:
        click.echo(e.format() if isinstance(e, Interrupted) else "interrupted.", err=True)
        sys.exit(130)
    if dry_run:
        for member in results:
            click.echo(f"{member['name']}: {member['recipe']} " + " ".join(f"--set {o}" for o in member["overrides"]))
        return
    done = [r["run_dir"] for r in results if r.get("run_dir")]
    if done:
        text, _, warnings = api.compare(done)
        click.echo(text, nl=False)
        for w in warnings:
            click.echo("warning: " + w, err=True)
    failed = [r for r in results if r["status"] == "failed"]
    for r in failed:
        click.echo(f"failed: {r['name']}: {r['error'].splitlines()[0]}", err=True)
    if failed:
        sys.exit(1)


@click.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@overrides_option
@click.option("--trials", type=click.IntRange(1), help="Trials the study ends with, over all workers (default: "
                                                         "tune.trials).")
@click.option("--storage", metavar="URL", help="A journal file, sqlite:///FILE or postgresql://... (default: "
                                              "tune.storage, else <output.root>/<study>-tune/study.journal).")
@click.option("--study", "study_name", metavar="NAME", help="The study's name (default: tune.study, else the "
                                                           "recipe's file name).")
@click.option("--report", "report_only", is_flag=True, help="Run no trial: print the study's sheet, best "
                                                           "parameters and importances, and write best.yaml.")
def tune(recipe, overrides, trials, storage, study_name, report_only):
    """Search RECIPE's `tune:` space with Optuna: each trial is a run folder, pruned early when it lags. Start
    the same command in several processes or on several machines to share one study."""
    from framework import api
    from framework.errors import Interrupted

    if report_only:
        click.echo(api.tune_report(recipe, overrides, storage, study_name)["text"])
        return
    try:
        result = api.tune(recipe, overrides, trials, storage, study_name, log=click.echo)
    except (Interrupted, KeyboardInterrupt) as e:
        click.echo(e.format() if isinstance(e, Interrupted) else "interrupted.", err=True)
        sys.exit(130)
    click.echo(result["text"])
