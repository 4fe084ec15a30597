"""Shared fixtures: the real data in ../shared/data, tiny recipes that train in seconds on a CPU."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("default", max_examples=60)
settings.register_profile("deep", max_examples=600)  # HYPOTHESIS_PROFILE=deep python -m pytest -k mutated
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RECIPE_TEST_DATA", REPO.parent / "shared" / "data")).resolve()


def pytest_sessionstart(session):
    if not (DATA / "utkface_subset" / "manifest.csv").is_file():
        raise pytest.UsageError(f"the real test data is missing: expected {DATA} (../shared/data beside the repo); "
                                "set RECIPE_TEST_DATA=/path/to/shared/data.")


@pytest.fixture(scope="session")
def data_root() -> Path:
    return DATA


def read_manifest(name: str) -> list[dict]:
    with open(DATA / name / "manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def tiny_manifest(path: Path, per_class: int = 12, dataset: str = "maskedfacenet_maskon",
                  column: str = "mask_state") -> Path:
    """A small manifest of real images (absolute paths), `per_class` of each class, whole groups kept."""
    rows = read_manifest(dataset)
    taken, out = {}, []
    for r in rows:
        if taken.get(r[column], 0) < per_class:
            taken[r[column]] = taken.get(r[column], 0) + 1
            out.append({"path": str(DATA / dataset / r["path"]), column: r[column], "group": r["group"]})
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["path", column, "group"])
        w.writeheader()
        w.writerows(out)
    return path


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """One finished tiny run (2 epochs, a checkpoint kept every epoch), trained once per session for every test that
    only reads a run folder (its recipe is `<run>/../../tiny.yaml`). A test that changes a run copies it first."""
    from framework import api

    tmp = tmp_path_factory.mktemp("finished")
    return api.run(tiny_recipe(tmp, checkpoint={"every": 1, "keep_last": 5}), name="tiny", log=lambda *_: None)


def tiny_recipe(tmp_path: Path, **sections) -> Path:
    """A recipe on a tiny real manifest with timm's test_resnet at 32 px: trains in seconds."""
    tiny_manifest(tmp_path / "tiny.csv")
    recipe = {
        "data": {"root": str(tmp_path), "sources": [{"type": "csv", "allow_outside_root": True,
                                                     "name": "maskon", "manifest": "tiny.csv",
                                                     "group_column": "group"}],
                 "target": {"column": "mask_state", "classes": ["wear", "incorrect", "not_wear"]}},
        "validation": {"type": "holdout", "ratio": 0.25},
        "transforms": {"image_size": 32, "train": [{"name": "HorizontalFlip"}]},
        "model": {"backbone": "test_resnet"},
        "train": {"epochs": 2, "batch_size": 8, "num_workers": 0},
        "logging": {"sample_grid": 4, "progress": False},
        "output": {"root": str(tmp_path / "runs")},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict) and key != "validation":
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    recipe = {k: v for k, v in recipe.items() if v is not None}
    recipe["data"] = {k: v for k, v in recipe["data"].items() if v is not None}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def load_script(path: Path):
    """A script (not a package module) imported as a module, to test its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
