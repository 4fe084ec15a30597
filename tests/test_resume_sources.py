"""Resume works for every shipped source type, with the data root as a recipe gets it by default (the working
directory) and source paths relative to it: the resolved recipe a run folder keeps must mean the same data when
it is read back from inside the run folder (the quickstart's resume once failed on exactly this)."""
from __future__ import annotations

import csv
import shutil

import pytest
import yaml

from framework import api
from tests.conftest import DATA, read_manifest

pytestmark = pytest.mark.slow  # trains two tiny epochs per source type


def _images(n_per_class: int) -> dict[str, list[str]]:
    """Real MaskedFace-Net images per mask class."""
    out: dict[str, list[str]] = {}
    for r in read_manifest("maskedfacenet_maskon"):
        if len(out.setdefault(r["mask_state"], [])) < n_per_class:
            out[r["mask_state"]].append(str(DATA / "maskedfacenet_maskon" / r["path"]))
    return out


def _folder_source(tmp):
    for cls, paths in _images(8).items():
        (tmp / "faces" / cls).mkdir(parents=True)
        for i, p in enumerate(paths):
            shutil.copy(p, tmp / "faces" / cls / f"{i}.jpg")
    return {"type": "folder", "name": "faces", "path": "faces"}, {"column": "label"}


def _csv_source(tmp):
    (tmp / "imgs").mkdir()
    rows = []
    for cls, paths in _images(8).items():
        for i, p in enumerate(paths):
            shutil.copy(p, tmp / "imgs" / f"{cls}{i}.jpg")
            rows.append({"path": f"{cls}{i}.jpg", "label": cls, "group": f"{cls}{i}"})
    with open(tmp / "imgs" / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "group"])
        w.writeheader()
        w.writerows(rows)
    return {"type": "csv", "name": "m", "manifest": "imgs/manifest.csv", "group_column": "group"}, {"column": "label"}


def _contest_source(tmp):
    """Person folders of the contest's layout assembled from real images (the people are not real: each folder's
    images come from several MaskedFace-Net faces)."""
    images = _images(24)
    for k in range(8):
        person = tmp / "train" / f"{k:06d}_{'female' if k % 2 else 'male'}_Asian_{20 + 5 * k}"
        person.mkdir(parents=True)
        for j in range(1, 6):
            shutil.copy(images["wear"][(k * 5 + j) % 24], person / f"mask{j}.jpg")
        shutil.copy(images["incorrect"][k], person / "incorrect_mask.jpg")
        shutil.copy(images["not_wear"][k], person / "normal.jpg")
    return {"type": "mask_contest", "name": "contest", "path": "train"}, {"column": "mask_state"}


def _bundled_source(tmp):
    return {"type": "bundled", "name": "lfw", "dataset": "lfw_subset", "cache_dir": str(tmp / "lfw")}, \
        {"column": "label"}


@pytest.mark.parametrize("make", [_folder_source, _csv_source, _contest_source, _bundled_source],
                         ids=["folder", "csv", "mask_contest", "bundled"])
def test_a_run_resumes_with_the_default_root_on_every_source_type(tmp_path, monkeypatch, make):
    monkeypatch.chdir(tmp_path)  # the default data.root
    source, target = make(tmp_path)
    recipe = {"data": {"sources": [source], "target": target},
              "validation": {"type": "holdout", "ratio": 0.25},
              "transforms": {"image_size": 32, "train": [{"name": "HorizontalFlip"}]},
              "model": {"backbone": "test_resnet"},
              "train": {"epochs": 1, "batch_size": 8, "num_workers": 0},
              "logging": {"sample_grid": 0, "progress": False}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = api.run(tmp_path / "r.yaml", name="first", log=lambda *_: None)
    assert yaml.safe_load((run / "recipe.resolved.yaml").read_text())["data"]["root"] == str(tmp_path)
    api.run(resume=run, overrides=["train.epochs=2"], log=lambda *_: None)
    summary = api.run_summary(run)
    assert summary["status"] == "finished" and summary["epochs_done"] == 2 and summary["resumed_at_epoch"] == 1


def test_a_file_path_set_inside_a_whole_section_is_recorded_absolute(tmp_path, monkeypatch):
    """`--set "validation={type: file, path: runs/a/split.csv}"` (docs/three_vs_one.sh): the split file's path is
    relative to the working directory, and the run folder records it absolute, so that reading the run back (evaluate,
    predict, resume) means the same file."""
    monkeypatch.chdir(tmp_path)
    source, target = _csv_source(tmp_path)
    recipe = {"data": {"sources": [source], "target": target}, "validation": {"type": "holdout", "ratio": 0.25},
              "transforms": {"image_size": 32, "train": []}, "model": {"backbone": "test_resnet"},
              "train": {"epochs": 1, "batch_size": 8, "num_workers": 0}, "logging": {"sample_grid": 0, "progress": False}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    first = api.run(tmp_path / "r.yaml", name="first", log=lambda *_: None)
    split = f"validation={{type: file, path: {first}/split.csv}}"  # (runs/first: relative)
    second = api.run(tmp_path / "r.yaml", [split], name="second", log=lambda *_: None)
    recorded = yaml.safe_load((second / "recipe.resolved.yaml").read_text())["validation"]["path"]
    assert not first.is_absolute() and recorded == str(tmp_path / first / "split.csv")
    assert api.evaluate(second)["metrics"]["macro_f1"] >= 0  # the run reads back
    api.run(resume=second, overrides=["train.epochs=2"], log=lambda *_: None)
    assert api.run_summary(second)["epochs_done"] == 2
