"""recipe: train image classifiers from declarative YAML recipes.

The public API is re-exported here by name; importing it does not import torch.
"""
import os as _os

_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would contact its index on import
_os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub look-ups fail fast instead of retrying offline

from framework.api import LoadedRecipe, load_recipe, run, validate  # noqa: E402
from framework.errors import DataError, Issue, RecipeError, RunError  # noqa: E402
from framework.recipe.schema import Recipe  # noqa: E402

__all__ = ["DataError", "Issue", "LoadedRecipe", "Recipe", "RecipeError", "RunError", "load_recipe", "run",
           "validate"]
__version__ = "0.1.0"
