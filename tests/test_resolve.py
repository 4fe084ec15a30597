"""The resolve stage: every failure that used to come 10-30 s into `recipe run` (and leave a failed run folder) is
caught by `recipe validate` with exit 2 and a located message, and `recipe run` stops before making a folder."""
from __future__ import annotations

import csv

import pytest
import yaml
from click.testing import CliRunner

from framework.cli import main
from tests.conftest import tiny_recipe


def _edit(path, change):
    recipe = yaml.safe_load(path.read_text())
    change(recipe)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _missing_image(tmp_path):
    path = tiny_recipe(tmp_path)
    manifest = tmp_path / "tiny.csv"
    rows = list(csv.DictReader(open(manifest, encoding="utf-8")))
    rows[3]["path"] = str(tmp_path / "gone" / "face.jpg")
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path, []


# (id, make(tmp_path) -> (recipe path, --set overrides), expected field, words the message must contain)
CASES = [
    ("unknown-backbone", lambda t: (tiny_recipe(t), ["model.backbone=resnet19"]), "model.backbone",
     ["unknown backbone 'resnet19'", "Did you mean"]),
    ("missing-weights", lambda t: (tiny_recipe(t), [f"model.weights={t / 'nowhere.pt'}"]), "model.weights",
     ["weights file not found", "nowhere.pt"]),
    ("tracker-not-installed", lambda t: (tiny_recipe(t), ["logging.trackers=[tensorboard,wandb]"]),
     "logging.trackers[1]", ["'wandb' is not installed", "pip install wandb"]),
    ("tracker-misspelt", lambda t: (tiny_recipe(t), ["logging.trackers=[tensorbord]"]), "logging.trackers[0]",
     ["unknown tracker 'tensorbord'", "Did you mean 'tensorboard'"]),
    ("unknown-monitor", lambda t: (tiny_recipe(t), ["checkpoint.monitor=val/macro_f2"]), "checkpoint.monitor",
     ["unknown metric 'val/macro_f2'", "Did you mean 'val/macro_f1'"]),
    ("monitor-of-a-lone-source", lambda t: (tiny_recipe(t), ["checkpoint.monitor=val/source/maskon/macro_f1"]),
     "checkpoint.monitor", ["unknown metric 'val/source/maskon/macro_f1'"]),  # per-source: several sources only
    ("missing-image", _missing_image, "data.sources[0]", ["1 image(s) of source 'maskon' do not exist",
                                                         "face.jpg", "bad_images: skip"]),
    ("oversize-crop", lambda t: (tiny_recipe(t), ["transforms.train=[{name: RandomCrop, height: 48, width: 48}]"]),
     "transforms.train[0]", ["RandomCrop outputs (48, 48), but the image size is (32, 32)"]),
    ("size-the-backbone-cannot-take", lambda t: (tiny_recipe(t), ["model.backbone=inception_v3"]),
     "transforms.image_size", ["inception_v3 cannot take 32x32 images"]),
    ("hub-weights-offline", lambda t: (tiny_recipe(t), ["model.backbone=resnet18", "model.pretrained=true"]),
     "model.pretrained", ["not in the local Hugging Face cache", "HF_HUB_OFFLINE=0"]),  # offline: conftest
    ("regression-loss-on-a-class-task", lambda t: (tiny_recipe(t), ["train.loss.name=mse"]), "train.loss.name",
     ["'mse' learns number targets", "use one of: cross_entropy"]),
]


@pytest.mark.parametrize("make,field,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validate_catches_what_run_would_fail_on_and_run_leaves_no_folder(tmp_path, make, field, words):
    path, overrides = make(tmp_path)
    sets = [a for o in overrides for a in ("--set", o)]
    result = CliRunner().invoke(main, ["validate", str(path), *sets])
    assert result.exit_code == 2, result.output
    message = result.output
    written_by_set = any(field.startswith(o.split("=")[0]) for o in overrides)
    where = "--set" if written_by_set else f"{path}:"  # where the value was written: the command line, or file:line
    assert message.startswith(where) and f": {field}:" in message, message
    for w in words:
        assert w in message, message
    assert "Traceback" not in message
    result = CliRunner().invoke(main, ["run", str(path), *sets, "--name", "late"])
    assert result.exit_code == 2 and words[0] in result.output, result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_missing_image_with_bad_images_skip_is_a_warning_and_the_run_trains(tmp_path):
    path, _ = _missing_image(tmp_path)
    result = CliRunner().invoke(main, ["validate", str(path), "--set", "data.bad_images=skip"])
    assert result.exit_code == 0 and "do not exist" in result.output and "They will be skipped" in result.output


def test_a_crop_without_a_size_follows_the_image_size(tmp_path):
    """hard_aug.yaml leaves RandomResizedCrop's size out: the README's 96 px sweep member builds 96 px crops."""
    from framework import api

    path = tiny_recipe(tmp_path, transforms={"image_size": 32, "train": [{"name": "RandomResizedCrop",
                                                                        "scale": [0.7, 1.0]}]})
    for size in (32, 48):
        resolved = api.validate(path, [f"transforms.image_size={size}"])
        from framework import transforms as T
        crop = T.build_augmentations(resolved.recipe.transforms, resolved.image_size)[0]
        assert tuple(crop.size) == (size, size)


def test_image_size_auto_is_the_backbones_own_and_is_written_concrete(tmp_path):
    from framework import api

    import timm

    resolved = api.validate(tiny_recipe(tmp_path, transforms={"image_size": "auto"}))
    own = tuple(timm.get_pretrained_cfg(resolved.recipe.model.backbone).input_size[1:])  # timm's, whatever it is
    assert resolved.image_size == own and resolved.recipe.transforms.image_size == own


def test_sync_batchnorm_on_cpu_processes_is_a_located_error_and_one_process_is_unchanged(tmp_path, monkeypatch):
    """SyncBatchNorm has no CPU kernel: several CPU processes would crash at the first step, so validate stops
    them; with one process the option changes nothing (the model keeps plain BatchNorm)."""
    import torch

    from framework import api
    from framework.build import build_run

    path = tiny_recipe(tmp_path, train={"sync_batchnorm": True, "num_workers": 0})
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and ": train.sync_batchnorm:" in result.output, result.output
    assert "needs GPUs" in result.output and "sync_batchnorm: false" in result.output
    monkeypatch.setenv("WORLD_SIZE", "1")
    resolved = api.validate(path)
    built = build_run(resolved.recipe, resolved.plan, tmp_path / "r", [])
    kinds = {type(m) for m in built.model.modules()}
    assert torch.nn.BatchNorm2d in kinds and torch.nn.SyncBatchNorm not in kinds


def test_sync_batchnorm_keeps_the_checkpoint_layout(tmp_path):
    """What build_run does with several GPU processes: the converted model has the same keys and tensors, so its
    checkpoints load into a one-process model and back."""
    import torch

    from framework import api
    from framework.models import build_model

    resolved = api.validate(tiny_recipe(tmp_path))
    model, _ = build_model(resolved.recipe.model, {"mask": 3}, (0.5,) * 3, (0.5,) * 3, (32, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    after = synced.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def _typo_row(tmp_path, recipe_path, value="dog"):
    manifest = tmp_path / "tiny.csv"
    rows = list(csv.DictReader(open(manifest, encoding="utf-8")))
    rows[0]["mask_state"] = value
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return recipe_path


def test_an_undeclared_label_value_is_an_error_with_its_count(tmp_path):
    path = _typo_row(tmp_path, tiny_recipe(tmp_path))  # classes are declared: wear, incorrect, not_wear
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and ": data.target.classes:" in result.output, result.output
    assert "'dog' (1 row)" in result.output and "map" in result.output


def test_a_class_found_with_a_single_row_is_a_warning_when_classes_are_not_declared(tmp_path):
    path = tiny_recipe(tmp_path)
    _edit(path, lambda r: r["data"]["target"].pop("classes"))
    _typo_row(tmp_path, path)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0 and "very few rows: 'dog' (1)" in result.output, result.output
    assert "declare `classes`" in result.output


def test_normalize_in_the_pipeline_is_an_error_and_totensorv2_is_left_out_with_a_warning(tmp_path):
    """The model normalises its own inputs: an albumentations Normalize would do it twice (silently wrong), and
    ToTensorV2 (habit from other projects) is the loader's job."""
    path = tiny_recipe(tmp_path, transforms={"image_size": 32, "train": [
        {"name": "HorizontalFlip"}, {"name": "Normalize", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}]})
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and ": transforms.train[1]:" in result.output, result.output
    assert "a second time" in result.output and "transforms.normalize" in result.output
    path = tiny_recipe(tmp_path, transforms={"image_size": 32, "train": [{"name": "HorizontalFlip"},
                                                                        {"name": "ToTensorV2"}]})
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0 and "ToTensorV2 is left out" in result.output, result.output


def test_a_saved_pipeline_with_normalize_is_an_error(tmp_path):
    from framework.libs import albumentations

    A = albumentations()
    saved = tmp_path / "aug.yaml"
    A.save(A.Compose([A.HorizontalFlip(), A.Normalize()]), str(saved), data_format="yaml")
    path = tiny_recipe(tmp_path, transforms={"image_size": 32, "train_file": str(saved), "train": []})
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and ": transforms.train_file:" in result.output and "a second time" in result.output


def test_a_fast_dev_run_keeps_a_few_images_per_class_and_side_and_says_so(monkeypatch, tmp_path):
    """RECIPE_FAST_DEV_RUN=N (what CI runs the README's commands with): the whole recipe, every check included, on
    N images per class and side; the rest are `unused` (never decoded), and the run says its figures mean nothing."""
    from framework.api import validate

    path = tiny_recipe(tmp_path)
    monkeypatch.setenv("RECIPE_FAST_DEV_RUN", "2")
    resolved = validate(path)
    counts = resolved.plan.counts()
    assert all(n == 2 for side in ("train", "val") for n in counts[side]["label"].values()), counts
    assert len(resolved.plan.indices("unused")) == len(resolved.plan.rows) - 12
    assert any("fast dev run" in w.message and "mean nothing" in w.message for w in resolved.loaded.warnings)
    monkeypatch.setenv("RECIPE_FAST_DEV_RUN", "few")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and "RECIPE_FAST_DEV_RUN='few' is not a number" in result.output, result.output
