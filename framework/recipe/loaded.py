"""A recipe file read, merged (extends, --set), its plugins loaded and its schema validated, with where each value
was written; and the resolved form written beside every run."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from framework.errors import FieldError, Issue, RecipeError
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

    def warn(self, path: tuple, message: str, fix: str = "") -> None:
        self.warnings.append(issue_at(self.locs, path, message, fix, str(self.path)))


def load_recipe(path: str | Path, overrides: list[str] | tuple = (), run_plugins: bool = True) -> LoadedRecipe:
    """Read, merge (extends, --set), load the plugins it names, validate the schema.

    `run_plugins=False` is for recipes from elsewhere (a run folder's recipe.resolved.yaml): none of the plugins it
    names is imported; each must already be loaded (by the user, `--plugin`), else a RunError names them."""
    path = Path(path)
    data, locs = load_dict(path, list(overrides))
    if run_plugins:
        load_plugins(data, locs, path)
    else:
        check_plugins_loaded(data, path)
    return LoadedRecipe(validate_data(data, locs, str(path)), path, locs)


def check_plugins_loaded(data: dict, path: Path) -> None:
    """A run folder names plugins (code) it was trained with; they run only if the user names them."""
    from framework.errors import RunError
    from framework.plugins import is_loaded, load_entry_points

    load_entry_points()  # installed packages: the user's own choice
    specs = [s for s in (data.get("plugins") or []) if isinstance(s, str)]
    missing = [s for s in specs if not is_loaded(s)]
    if missing:
        raise RunError(Issue(f"this run was trained with plugin code ({', '.join(missing)}); code named by a run "
                             "folder is never imported on its own (a shared run folder could run anything).",
                             field="plugins", file=str(path),
                             fix="if you trust it, name each plugin yourself: " +
                                 " ".join(f"--plugin {s}" for s in missing) + "."))


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


def resolved_yaml(recipe: Recipe) -> str:
    """The recipe with every default filled in: what a run folder keeps, so that it reruns as it ran."""
    return yaml.safe_dump(json.loads(recipe.model_dump_json()), sort_keys=False, allow_unicode=True)


def flatten(data, prefix: str = "") -> dict[str, object]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; a list of mappings (sources, augmentations) by position,
    `data.sources.1.manifest`; other lists are values (compared whole)."""
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        out = {}
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: data}


# Keys a trained run's recipe may differ in from its checkpoint's without changing what the model predicts: where
# the data, its split and the run folder are, how the run reports, how long it trains.
NOT_THE_MODEL = ("data.", "validation.", "output.", "logging.", "notes", "train.epochs", "eval.", "plugins", "tune")


def edited_keys(now: dict, then: dict, ignore: tuple = ("train.epochs",), known_only: bool = False) -> list[str]:
    """The recipe keys whose values differ between two recipes (as dumped), except those starting with `ignore`;
    `known_only`: only keys `then` has (a setting added to the schema later is not an edit)."""
    a, b = flatten(now), flatten(then)
    keys = set(b) if known_only else set(a) | set(b)
    return sorted(k for k in keys if a.get(k) != b.get(k) and not k.startswith(ignore))
