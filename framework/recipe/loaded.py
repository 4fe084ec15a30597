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


def load_recipe(path: str | Path, overrides: list[str] | tuple = ()) -> LoadedRecipe:
    """Read, merge (extends, --set), load the plugins it names, validate the schema."""
    path = Path(path)
    data, locs = load_dict(path, list(overrides))
    load_plugins(data, locs, path)
    return LoadedRecipe(validate_data(data, locs, str(path)), path, locs)


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
