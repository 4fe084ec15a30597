"""`recipe`: the command line. It parses, calls framework.api and prints; heavy imports happen inside commands."""
from __future__ import annotations

import sys

import click

from framework.errors import RecipeError

SET_HELP = "Override a recipe value, e.g. --set train.lr=3e-4 (repeatable; values are YAML)."


def _fail(err: RecipeError) -> None:
    click.echo(err.format(), err=True)
    sys.exit(err.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="recipe-framework", prog_name="recipe")
def main():
    """Train image classifiers from declarative YAML recipes."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--print", "print_", is_flag=True, help="Print the fully resolved recipe and the classes.")
def validate(recipe, overrides, print_):
    """Check RECIPE and its data (sources, labels, split, leakage) without training. Exit 2 on errors."""
    from framework import api

    try:
        loaded, plan = api.validate(recipe, overrides)
    except RecipeError as e:
        _fail(e)
    for w in loaded.warnings:
        click.echo("warning: " + w.format(), err=True)
    if print_:
        click.echo(api.resolved_yaml(loaded.recipe), nl=False)
        for task, labels in plan.labels.items():
            click.echo(f"# {task} classes (index = {labels.formula}):")
            for k, c in enumerate(labels.classes):
                click.echo(f"#   {k:3d}  {c}")
    tasks = ", ".join(f"{t}: {len(lab.classes)} classes" for t, lab in plan.labels.items())
    click.echo(f"ok: {recipe}: {len(plan.rows)} images ({tasks}), "
               f"{len(plan.indices('train'))} train / {len(plan.indices('val'))} val")


@main.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--name", help="Run folder name (default: <recipe>-<date>-<time>); never overwrites a folder.")
@click.option("--resume", type=click.Path(file_okay=False), help="Continue the run in this folder.")
def run(recipe, overrides, name, resume):
    """Train RECIPE into a new run folder (or continue one with --resume RUN_DIR)."""
    if bool(recipe) == bool(resume):
        raise click.UsageError("give either a RECIPE file or --resume RUN_DIR.")
    from framework import api

    try:
        run_dir = api.run(recipe, overrides, name=name, resume=resume, log=click.echo)
    except RecipeError as e:
        _fail(e)
    except KeyboardInterrupt:
        sys.exit(130)
    import json
    summary = json.loads((run_dir / "summary.json").read_text())
    click.echo(f"done: {run_dir}  best {summary.get('best_metric')} = {summary.get('best_value')} "
               f"at epoch {summary.get('best_epoch')}  ({summary['wall_seconds']:.0f}s)")


@main.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
def plugins(recipe):
    """List registered transforms, backbones, losses and readers, with where each came from.

    Installed packages' plugins are always listed; give a RECIPE to include the plugins it names."""
    from framework import api

    try:
        table = api.registered(recipe)
    except RecipeError as e:
        _fail(e)
    extra = {"transforms": "and every albumentations transform", "backbones": "and every timm model"}
    for kind, entries in table.items():
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

    from framework.recipe.schema import Recipe

    text = json.dumps(Recipe.model_json_schema(), indent=2)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        click.echo(text)


if __name__ == "__main__":
    main()
