"""The `data` and `validation` sections: sources, labels, and how the rows are split."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from framework.recipe.schema.base import _Section


# ----------------------------------------------------------------------------------------------------- data
_TRAIN_ONLY = Field(False, description="Extra training data: these rows always train and are never validated on; "
                                       "the validation policy splits the other sources alone (their split is the "
                                       "same with or without this one). Rows whose group is in validation are "
                                       "left out (`unused` in split.csv).")


class _Source(_Section):
    train_only: bool = _TRAIN_ONLY


class FolderSource(_Source):
    """Images in one sub-folder per class: `<path>/<class>/<image>`."""

    type: Literal["folder"]
    name: str = Field(description="Name of the source, used by `validation: {type: source}` and in reports.")
    path: str = Field(description="Folder holding one sub-folder per class (relative to data.root).")
    column: str = Field("label", description="Column that receives the sub-folder name.")


class CsvSource(_Source):
    """A manifest CSV: one row per image, a path column and label columns."""

    type: Literal["csv"]
    name: str = Field(description="Name of the source.")
    manifest: str = Field(description="CSV file (relative to data.root).")
    root: str | None = Field(None, description="Folder the image paths are relative to (default: the CSV's folder).")
    path_column: str = Field("path", description="Column with the image path.")
    group_column: str | None = Field(None, description="Column with a group id (person, duplicate group); "
                                                       "a group never sits on both sides of a split.")
    allow_outside_root: bool = Field(False, description="Let image paths point outside the image root (absolute "
                                                        "paths, or links that lead out). Off: a manifest from "
                                                        "someone else cannot make a run read /etc/passwd or a device.")
    box_columns: list[str] | None = Field(None, min_length=4, max_length=4,
                                          description="Face box columns xmin, ymin, xmax, ymax in image pixels.")
    filter: dict[str, list[Any]] | None = Field(None, description="Keep only rows whose column value is listed, "
                                                                  "e.g. {subtype: [Mask, Mask_Chin]}.")


class MaskContestSource(_Source):
    """The contest layout: `<path>/<ID>_<gender>_<race>_<age>/{mask1..mask5,incorrect_mask,normal}.<ext>`.

    Yields columns mask_state (wear / incorrect / not_wear), gender, race, age and person (also the group)."""

    type: Literal["mask_contest"]
    name: str = Field(description="Name of the source.")
    path: str = Field(description="Folder holding one folder per person (relative to data.root).")


class BundledSource(_Source):
    """Real images that ship inside an installed package, written out as files on first use."""

    type: Literal["bundled"]
    name: str = Field(description="Name of the source.")
    dataset: Literal["lfw_subset", "digits"] = Field(
        description="lfw_subset: scikit-image's 100 faces + 100 non-faces (25 px); digits: scikit-learn's 8x8 digits.")
    cache_dir: str | None = Field(None, description="Where the image files are written "
                                                    "(default: ~/.cache/recipe/<dataset>).")


class PluginSource(BaseModel):
    """A source read by a plugin's reader (`type` = its registered name); the reader checks the other keys."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(description="Name of a reader registered by a plugin.")
    name: str = Field(description="Name of the source.")
    train_only: bool = _TRAIN_ONLY


_BUILTIN_SOURCES = {"folder", "csv", "mask_contest", "bundled"}


def _source_kind(value) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if kind is None:
        return None
    return kind if isinstance(kind, str) and kind in _BUILTIN_SOURCES else "plugin"


Source = Annotated[Union[Annotated[FolderSource, Tag("folder")], Annotated[CsvSource, Tag("csv")],
                         Annotated[MaskContestSource, Tag("mask_contest")], Annotated[BundledSource, Tag("bundled")],
                         Annotated[PluginSource, Tag("plugin")]],
                   Discriminator(_source_kind)]


class LabelSpec(_Section):
    """How one column becomes class indices."""

    column: str = Field(description="Column holding the label (a manifest column, or `label` for folder sources).")
    map: dict[str, str] | None = Field(None, description="Rename values before anything else, "
                                                         "e.g. {con_mascarilla: wear}.")
    classes: list[str] | None = Field(None, description="Class names in index order. Default: the sorted values "
                                                        "found in the data (or the bin names).")
    bins: list[float] | None = Field(None, description="Cut points for a numeric column: [30, 60] gives classes "
                                                       "<30, 30-59, 60+ (a value equal to a cut goes up).")

    @field_validator("bins")
    @classmethod
    def _increasing(cls, v):
        if v is not None and (not v or any(b >= a for a, b in zip(v[1:], v[:-1]))):
            raise ValueError("bins must be a non-empty list of strictly increasing cut points, e.g. [30, 60]")
        return v

    @model_validator(mode="after")
    def _bins_or_map(self):
        if self.bins is not None and self.map is not None:
            raise ValueError("use either `bins` (numeric column) or `map` (text column), not both")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must be unique")
        return self


class TargetSpec(LabelSpec):
    """The label the model learns: one column, or `composite` of several (mask x gender x age = 18 classes)."""

    column: str | None = Field(None, description="Column holding the label.")
    composite: dict[str, LabelSpec] | None = Field(
        None, description="Several labels combined into one class: index = sum(index_i * prod(n_j for j > i)), "
                          "e.g. mask*6 + gender*3 + age for 3 x 2 x 3 classes.")

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.column is None) == (self.composite is None):
            raise ValueError("give either `column` or `composite`")
        if self.composite is not None and any(x is not None for x in (self.map, self.classes, self.bins)):
            raise ValueError("`map`, `classes` and `bins` go inside each part of `composite`")
        return self


class DataSection(_Section):
    """Where the images and labels come from."""

    root: str = Field(".", description="Folder that data source paths are relative to; "
                                       "override per machine with --set data.root=/path.")
    sources: list[Source] = Field(min_length=1, description="One or more sources, concatenated.")
    target: TargetSpec | None = Field(None, description="The label to learn (one head). For several heads, use the "
                                                       "top-level `tasks` instead.")
    missing_label: Literal["drop", "error"] = Field(
        "drop", description="Rows without a label: drop them (the count is reported) or stop with an error.")
    bad_images: Literal["error", "skip"] = Field(
        "error", description="Unreadable images: stop naming the file, or skip them (listed in the run folder).")
    cache: Literal["memory", "disk", "none"] = Field(
        "memory", description="Decode and resize each image once and keep the result in memory, or on disk (large "
                              "sets; reused across runs), or decode every time. Augmentations run every epoch.")
    cache_dir: str = Field("~/.cache/recipe/images", description="Folder of the disk cache.")
    cache_max_gb: float = Field(20.0, gt=0, description="Size limit of the disk cache; least recently used "
                                                        "entries go first.")

    @property
    def train_only(self) -> set[str]:
        """Names of the sources that only train (never validated on)."""
        return {s.name for s in self.sources if getattr(s, "train_only", False)}

    @model_validator(mode="after")
    def _unique_names(self):
        names = [s.name for s in self.sources]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"source names must be unique, repeated: {sorted(dup)}")
        return self


# ----------------------------------------------------------------------------------------------- validation
class _SplitOptions(_Section):
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the split; the same seed gives the same split.")
    stratify: bool | str = Field(True, description="Keep class proportions: true = by the target, a column name "
                                                   "= by that column, false = no stratification.")
    group_by: str | None = Field("group", description="Column whose values never sit on both sides (`group` = "
                                                      "each source's group column); null = every image alone.")
    per_source: bool = Field(False, description="Split each source on its own, exactly as a recipe of that "
                             "source alone would (same seed, same validation images), so one model trained on "
                             "several sources is scored on the images each single-source recipe is. A group "
                             "validated in one source does not train from another (`unused` in split.csv).")


class HoldoutSplit(_SplitOptions):
    """A single train / validation split, e.g. 8:2 or 7:3."""

    type: Literal["holdout"]
    ratio: float = Field(0.2, gt=0, lt=1, description="Share of the data in validation.")


class KFoldSplit(_SplitOptions):
    """k folds (stratified, grouped); `fold` is the validation fold of this run."""

    type: Literal["kfold"]
    k: int = Field(5, ge=2, le=100, description="Number of folds.")
    fold: int = Field(0, ge=0, description="Which fold is validation (0 .. k-1).")

    @model_validator(mode="after")
    def _fold_in_range(self):
        if self.fold >= self.k:
            raise ValueError(f"fold must be below k={self.k}")
        return self


class SourceSplit(_Section):
    """A named data source is the validation set (e.g. external data of another ethnicity); the rest trains."""

    type: Literal["source"]
    source: str = Field(description="Name of the source used for validation.")


class FileSplit(_Section):
    """A split CSV with columns `path` and `split` (train / val), e.g. a previous run's split.csv."""

    type: Literal["file"]
    path: str = Field(description="The split CSV (relative to the recipe).")


Validation = Annotated[Union[HoldoutSplit, KFoldSplit, SourceSplit, FileSplit], Field(discriminator="type")]
