"""Loading recipes: extends, overrides, locations, and every bundled recipe validates."""
from pathlib import Path

import pytest

from framework import api
from framework.errors import RecipeError
from framework.recipe.load import deep_merge, load_dict, parse_override
from tests.conftest import read_manifest

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_bundled_recipe_validates(path, tmp_path):
    overrides = []
    weights = api.load_recipe(path).recipe.model.weights
    if weights and "/runs/" in weights:  # starts from another recipe's run: validate says so until it exists
        with pytest.raises(RecipeError, match=r"model\.weights: weights file not found: .*train that run first"):
            api.validate(path)
        import timm
        import torch
        backbone = api.load_recipe(path).recipe.model.backbone  # a stand-in of the right shapes (an untrained one)
        torch.save(timm.create_model(backbone).state_dict(), tmp_path / "stand_in.pt")
        overrides = [f"model.weights={tmp_path / 'stand_in.pt'}"]
    if path.name.startswith("contest_"):  # the contest's layout: a folder of its shape, made from ../shared/data
        from tests.conftest import load_script

        load_script(REPO / "scripts" / "make_contest_fixture.py").build(tmp_path / "contest", persons=24, eval_persons=1)
        overrides.append(f"data.root={tmp_path / 'contest'}")
    resolved = api.validate(path, overrides)
    plan = resolved.plan
    assert plan.indices("train") and plan.indices("val")
    assert all(len(labels.classes) >= 2 for labels in plan.labels.values())
    assert resolved.recipe.transforms.image_size != "auto"


def test_deep_merge_merges_mappings_and_replaces_lists():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    over = {"a": {"y": [3]}, "c": 2}
    assert deep_merge(base, over) == {"a": {"x": 1, "y": [3]}, "b": 1, "c": 2}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1}  # inputs untouched


def test_a_mapping_of_another_kind_replaces_the_base_one_whole():
    """Another split policy, optimizer or loss does not inherit the other kind's options (a holdout's `ratio` under
    k-fold would be an unknown key); the same kind still merges key by key."""
    base = {"validation": {"type": "holdout", "ratio": 0.2, "group_by": "group"},
            "train": {"optimizer": {"name": "adamw", "lr": 0.002, "weight_decay": 0.05}, "epochs": 15}}
    assert deep_merge(base, {"validation": {"type": "kfold", "k": 5}})["validation"] == {"type": "kfold", "k": 5}
    assert deep_merge(base, {"train": {"optimizer": {"name": "sgd", "lr": 0.1}}})["train"] == {
        "optimizer": {"name": "sgd", "lr": 0.1}, "epochs": 15}
    assert deep_merge(base, {"validation": {"type": "holdout", "ratio": 0.3}})["validation"] == {
        "type": "holdout", "ratio": 0.3, "group_by": "group"}


def test_kaggle_cv_recipe_swaps_the_holdout_for_folds_and_keeps_the_rest():
    holdout = api.load_recipe(REPO / "recipes" / "kaggle_crops_mask.yaml").recipe
    loaded = api.load_recipe(REPO / "recipes" / "kaggle_crops_mask_cv.yaml")
    cv = loaded.recipe
    assert cv.validation.type == "kfold" and cv.validation.k == 5 and cv.validation.group_by == "group"
    assert cv.train == holdout.train and cv.data == holdout.data and cv.transforms == holdout.transforms
    assert loaded.locs[("validation", "type")][0].endswith("kaggle_crops_mask_cv.yaml")
    assert ("validation", "ratio") not in loaded.locs  # the base's holdout options left with it


def test_hard_aug_extends_soft_aug_and_replaces_the_augmentation_list():
    soft, _ = load_dict(REPO / "recipes" / "soft_aug.yaml")
    hard, locs = load_dict(REPO / "recipes" / "hard_aug.yaml")
    assert hard["data"] == soft["data"] and hard["model"] == soft["model"]
    assert hard["transforms"]["image_size"] == soft["transforms"]["image_size"]  # merged from the base
    assert [t["name"] for t in hard["transforms"]["train"]] != [t["name"] for t in soft["transforms"]["train"]]
    assert locs[("transforms", "train", 0)][0].endswith("hard_aug.yaml")
    assert locs[("model", "backbone")][0].endswith("soft_aug.yaml")  # inherited values keep their own file


def test_overrides_are_yaml_scalars_and_validated():
    path, value = parse_override("train.lr=3e-4")
    assert path == ("train", "lr") and value == pytest.approx(3e-4)
    assert parse_override("transforms.image_size=[128, 96]")[1] == [128, 96]
    assert parse_override("a.b=1e3")[1] == 1000.0 and parse_override("a.b=name")[1] == "name"
    loaded = api.load_recipe(REPO / "recipes" / "soft_aug.yaml",
                             ["model.backbone=efficientnet_b0", "train.optimizer.lr=0.01", "transforms.train.0.p=1"])
    assert loaded.recipe.model.backbone == "efficientnet_b0"
    assert loaded.recipe.train.optimizer.lr == 0.01
    assert loaded.recipe.transforms.train[0]["p"] == 1
    with pytest.raises(RecipeError) as e:
        api.load_recipe(REPO / "recipes" / "soft_aug.yaml", ["train.epochs=many"])
    assert "--set" in str(e.value) and "train.epochs" in str(e.value)


def test_data_root_is_relative_to_the_recipe_and_overridable(tmp_path, data_root):
    loaded = api.load_recipe(REPO / "recipes" / "soft_aug.yaml")
    assert Path(loaded.recipe.data.root) == data_root
    moved = api.load_recipe(REPO / "recipes" / "soft_aug.yaml", [f"data.root={tmp_path}"])
    assert Path(moved.recipe.data.root) == tmp_path


def test_extends_cycle_lists_the_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(RecipeError) as e:
        load_dict(tmp_path / "a.yaml")
    assert "a.yaml -> b.yaml -> a.yaml" in str(e.value)


def test_composite_label_writes_out_the_formula(tmp_path, data_root):
    (tmp_path / "r.yaml").write_text(f"""
data:
  root: {data_root}
  sources: [{{type: csv, name: utk, manifest: utkface_subset/manifest.csv, group_column: group}}]
  target:
    composite:
      gender: {{column: gender, classes: [male, female]}}
      age: {{column: age, bins: [30, 60]}}
model: {{backbone: resnet18}}
""")
    resolved = api.validate(tmp_path / "r.yaml")
    loaded, plan = resolved.loaded, resolved.plan
    labels = plan.labels["label"]
    assert labels.formula == "gender*3 + age"
    assert labels.classes == ["male/<30", "male/30-59", "male/60+", "female/<30", "female/30-59", "female/60+"]
    for row, y in zip(plan.rows, plan.ys["label"]):
        assert labels.classes[y] == f"{row['gender']}/{row['age_band']}"
    no_gender = [r for r in read_manifest("utkface_subset") if not r["gender"]]
    assert no_gender and plan.dropped == len(no_gender)  # malformed file names carry no gender
