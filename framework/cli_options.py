"""Options several `recipe` commands share (click decorators) and their small helpers."""
from __future__ import annotations

import click


def overrides_option(f):
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help="Override a recipe value, e.g. --set train.optimizer.lr=3e-4 (repeatable; values are "
                             "YAML).")(f)


def tta_option(f):
    return click.option("--tta", type=click.Choice(["hflip", "none"]),
                        help="hflip: average with the mirror image; none: no TTA (default: the run's eval.tta).")(f)


def images_options(f):
    f = click.option("--csv", "csv_file", type=click.Path(dir_okay=False), help="CSV with a `path` column.")(f)
    return click.option("--images", type=click.Path(file_okay=False), help="Folder of images (searched recursively).")(f)


def prior_shift_option(f):
    return click.option("--prior-shift", metavar="em|FILE",
                        help="Re-weight probabilities to the test set's class priors: `em` estimates them from the "
                             "unlabeled images (Saerens et al. 2002); a JSON file gives them, e.g. "
                             "{\"mask\": {\"wear\": 0.2, ...}}.")(f)


def plugin_option(f):
    return click.option("--plugin", "plugins", multiple=True, metavar="FILE|MODULE",
                        help="Load this plugin first (repeatable): a run folder's own plugin list is never imported, "
                             "name the ones you trust.")(f)


def load_plugins(specs) -> None:
    from framework import api

    for spec in specs:
        api.load_plugin(spec)


def one_source(images, csv_file):
    if bool(images) == bool(csv_file):
        raise click.UsageError("give either --images DIR or --csv FILE.")
    return images or csv_file
