"""recipe: train image classifiers from declarative YAML recipes.

The public API, re-exported by name (importing it does not import torch, and changes no environment variable):

    import framework as rf
    rf.validate(path, overrides)      -> a resolved recipe (every check `recipe validate` runs), or RecipeError
    rf.run(path, overrides, name=...) -> the run folder
    rf.tune(path, overrides)          -> the study's report (Optuna search over the recipe's `tune:` space)
    rf.predict / evaluate / ensemble / explain / inspect / compare / sweep / run_all_folds / cross_validate
"""
from framework.api import (compare, cross_validate, ensemble, evaluate, explain, inspect, predict, registered,
                           run, run_all_folds, run_or_continue, schema, sweep, tune, tune_report, validate)
from framework.errors import DataError, Interrupted, Issue, Pruned, RecipeError, RunError
from framework.recipe.loaded import LoadedRecipe, load_recipe, resolved_yaml
from framework.recipe.schema import Recipe

__all__ = ["DataError", "Interrupted", "Issue", "Pruned", "LoadedRecipe", "Recipe", "RecipeError", "RunError", "compare",
           "cross_validate", "ensemble", "evaluate", "explain", "inspect", "load_recipe", "predict", "registered",
           "resolved_yaml", "run", "run_all_folds", "run_or_continue", "schema", "sweep", "tune",
           "tune_report", "validate"]
__version__ = "0.1.0"
