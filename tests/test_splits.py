"""Splits on the real manifests: grouped holdout, stratified k-fold, age binning, the mask-contest reader."""
from collections import Counter

import pytest

from framework.build import build_data
from framework.data.labels import assign_labels, bin_names
from framework.data.readers import read_sources
from framework.data.splits import audit, build_split, kfold_assignment
from framework.errors import FieldError
from framework.recipe.schema import DataSection, FileSplit, HoldoutSplit, KFoldSplit, Recipe
from tests.conftest import read_manifest


def _utk(data_root, target=None):
    d = DataSection(root=str(data_root), sources=[{"type": "csv", "name": "utk", "manifest":
                                                     "utkface_subset/manifest.csv", "group_column": "group"}],
                    target=target or {"column": "label"})
    rows, y, labels, dropped = assign_labels(read_sources(d), d.target)
    return rows, y, labels


@pytest.mark.parametrize("ratio", [0.2, 0.3])
def test_grouped_holdout_on_utkface_keeps_groups_whole_and_hits_the_ratio(data_root, ratio):
    rows, y, labels = _utk(data_root)
    sides = build_split(rows, y, HoldoutSplit(type="holdout", ratio=ratio, group_by="group"))
    groups = Counter(r["group"] for r in rows)
    assert max(groups.values()) > 1  # the data has real multi-image groups (duplicates with conflicting labels)
    side_of = {}
    for r, s in zip(rows, sides):
        assert side_of.setdefault(r["group"], s) == s, f"group {r['group']} on both sides"
    n_val = sides.count("val")
    assert abs(n_val - ratio * len(rows)) <= max(groups.values())
    per_class = Counter((t, s) for t, s in zip(y, sides))
    for k in range(len(labels.classes)):
        total = per_class[(k, "val")] + per_class[(k, "train")]
        assert abs(per_class[(k, "val")] - ratio * total) <= max(groups.values())
    assert audit(rows, sides)[0] == []


def test_holdout_is_deterministic_for_a_seed_and_changes_with_it(data_root):
    rows, y, _ = _utk(data_root)
    a = build_split(rows, y, HoldoutSplit(type="holdout", seed=1))
    assert a == build_split(rows, y, HoldoutSplit(type="holdout", seed=1))
    assert a != build_split(rows, y, HoldoutSplit(type="holdout", seed=2))


def test_stratified_kfold_partitions_with_class_proportions_within_one_sample(data_root):
    rows, y, labels = _utk(data_root)
    k = 5
    folds = kfold_assignment(rows, y, KFoldSplit(type="kfold", k=k, group_by=None))
    assert sorted(set(folds)) == list(range(k))  # every row in exactly one fold
    counts = Counter(zip(y, folds))
    for c in range(len(labels.classes)):
        per_fold = [counts[(c, f)] for f in range(k)]
        assert max(per_fold) - min(per_fold) <= 1, (labels.classes[c], per_fold)
    sizes = Counter(folds).values()
    assert max(sizes) - min(sizes) <= 1
    # the validation sides of the k runs partition the data
    seen = Counter()
    for fold in range(k):
        sides = build_split(rows, y, KFoldSplit(type="kfold", k=k, fold=fold, group_by=None))
        seen.update(i for i, s in enumerate(sides) if s == "val")
    assert set(seen.values()) == {1} and len(seen) == len(rows)


def test_grouped_kfold_keeps_groups_in_one_fold(data_root):
    rows, y, labels = _utk(data_root)
    folds = kfold_assignment(rows, y, KFoldSplit(type="kfold", k=4))
    fold_of = {}
    for r, f in zip(rows, folds):
        assert fold_of.setdefault(r["group"], f) == f
    big = max(Counter(r["group"] for r in rows).values())
    counts = Counter(zip(y, folds))
    for c in range(len(labels.classes)):
        per_fold = [counts[(c, f)] for f in range(4)]
        assert max(per_fold) - min(per_fold) <= big + 1


def test_age_binning_reproduces_the_age_band_column(data_root):
    rows, y, labels = _utk(data_root, {"column": "age", "bins": [30, 60]})
    assert labels.classes == ["<30", "30-59", "60+"] == bin_names([30, 60])
    assert len(rows) == sum(1 for r in read_manifest("utkface_subset") if r["age"])  # every row with an age
    assert all(labels.classes[t] == r["age_band"] for r, t in zip(rows, y))
    moved = _utk(data_root, {"column": "age", "bins": [30, 58]})
    assert moved[2].classes == ["<30", "30-57", "58+"]
    assert sum(t == 2 for t in moved[1]) > sum(t == 2 for t in y)  # 58 and 59 year olds move up


def test_source_policy_uses_external_data_as_validation(data_root):
    recipe = Recipe.model_validate({
        "data": {"root": str(data_root), "target": {"column": "mask_state"}, "sources": [
            {"type": "csv", "name": "maskon", "manifest": "maskedfacenet_maskon/manifest.csv", "group_column": "group"},
            {"type": "csv", "name": "kaggle", "manifest": "face_mask_kaggle3/crops_manifest.csv",
             "group_column": "group"}]},
        "validation": {"type": "source", "source": "kaggle"}, "model": {"backbone": "resnet18"}})
    plan = build_data(recipe)
    assert {r["source"] for r, s in zip(plan.rows, plan.sides) if s == "val"} == {"kaggle"}
    assert {r["source"] for r, s in zip(plan.rows, plan.sides) if s == "train"} == {"maskon"}


def _mask_recipe(data_root, extra: dict, validation: dict | None = None) -> Recipe:
    return Recipe.model_validate({
        "data": {"root": str(data_root), "target": {"column": "mask_state"}, "sources": [
            {"type": "csv", "name": "kaggle", "manifest": "face_mask_kaggle3/crops_manifest.csv",
             "group_column": "group"},
            {"type": "csv", "name": "chandrikadeb7", "manifest": "chandrikadeb7_mask2/manifest.csv",
             "group_column": "group", **extra}]},
        "validation": validation or {"type": "holdout", "ratio": 0.2, "group_by": "group", "seed": 0},
        "model": {"backbone": "resnet18"}})


@pytest.mark.slow
def test_train_only_source_trains_and_leaves_the_other_split_unchanged(data_root):
    """chandrikadeb7 as extra training data for the kaggle crops: the kaggle split is the same as without it, no
    chandrikadeb7 image is validated on, and its near-duplicates of validation scenes (shared groups) are left out."""
    alone = build_data(Recipe.model_validate({
        "data": {"root": str(data_root), "target": {"column": "mask_state"}, "sources": [
            {"type": "csv", "name": "kaggle", "manifest": "face_mask_kaggle3/crops_manifest.csv",
             "group_column": "group"}]},
        "validation": {"type": "holdout", "ratio": 0.2, "group_by": "group", "seed": 0},
        "model": {"backbone": "resnet18"}}))
    plan = build_data(_mask_recipe(data_root, {"train_only": True}))
    kaggle = [(r["path"], s) for r, s in zip(plan.rows, plan.sides) if r["source"] == "kaggle"]
    assert kaggle == [(r["path"], s) for r, s in zip(alone.rows, alone.sides)]
    extra = [(r, s) for r, s in zip(plan.rows, plan.sides) if r["source"] == "chandrikadeb7"]
    assert {s for _, s in extra} == {"train", "unused"}
    val_groups = {r["group"] for r, s in zip(plan.rows, plan.sides) if s == "val"}
    unused = [r for r, s in extra if s == "unused"]
    assert unused and all(r["group"] in val_groups for r in unused)
    assert not any(r["group"] in val_groups for r, s in extra if s == "train")
    assert audit(plan.rows, plan.sides)[0] == []
    # without train_only the same data is split jointly: chandrikadeb7 images land in validation
    joint = build_data(_mask_recipe(data_root, {}))
    assert any(r["source"] == "chandrikadeb7" and s == "val" for r, s in zip(joint.rows, joint.sides))


@pytest.mark.slow
@pytest.mark.parametrize("policy", [{"type": "holdout", "ratio": 0.2}, {"type": "kfold", "k": 5, "fold": 3}])
def test_per_source_split_is_each_single_source_recipes_split(data_root, policy):
    """`per_source: true`: every source is split exactly as a recipe of that source alone splits it (same images in
    validation), and a training image whose group is validated in the other source is left out, not trained on."""
    both = build_data(_mask_recipe(data_root, {}, {**policy, "per_source": True, "seed": 0}))
    val_groups = {r["group"] for r, s in zip(both.rows, both.sides) if s == "val"}
    for name, manifest in (("kaggle", "face_mask_kaggle3/crops_manifest.csv"),
                           ("chandrikadeb7", "chandrikadeb7_mask2/manifest.csv")):
        alone = build_data(Recipe.model_validate({
            "data": {"root": str(data_root), "target": {"column": "mask_state"}, "sources": [
                {"type": "csv", "name": name, "manifest": manifest, "group_column": "group"}]},
            "validation": {**policy, "seed": 0}, "model": {"backbone": "resnet18"}}))
        mine = [(r["path"], s) for r, s in zip(both.rows, both.sides) if r["source"] == name]
        assert [p for p, _ in mine] == [r["path"] for r in alone.rows]
        for (path, s), r, s_alone in zip(mine, alone.rows, alone.sides):
            # the same side, except a training image of a group that the other source validates
            assert s == s_alone or (s, s_alone) == ("unused", "train") and r["group"] in val_groups, path
    # the two sets share scenes (same group id): on the 8:2 split some of them are validated on one side only
    assert ("unused" in both.sides) == (policy["type"] == "holdout")
    assert audit(both.rows, both.sides)[0] == []
    joint = build_data(_mask_recipe(data_root, {}, {**policy, "seed": 0}))
    assert joint.sides != both.sides and "unused" not in joint.sides


def test_train_only_source_cannot_be_the_validation_source(data_root):
    with pytest.raises(FieldError) as e:
        build_data(_mask_recipe(data_root, {"train_only": True}, {"type": "source", "source": "chandrikadeb7"}))
    assert "train_only" in str(e.value) and e.value.items[0][0] == ("validation", "source")


def test_split_file_policy_and_planted_leak_is_an_error(tmp_path, data_root):
    rows, y, _ = _utk(data_root)
    sides = build_split(rows, y, HoldoutSplit(type="holdout"))
    lines = ["path,split"] + [f"{r['path']},{s}" for r, s in zip(rows, sides)]
    (tmp_path / "split.csv").write_text("\n".join(lines) + "\n")
    assert build_split(rows, y, FileSplit(type="file", path=str(tmp_path / "split.csv"))) == sides
    # plant a leak: move one member of a multi-image group to the other side
    group = next(g for g, n in Counter(r["group"] for r in rows).items() if n > 1)
    i = next(i for i, r in enumerate(rows) if r["group"] == group)
    sides[i] = "val" if sides[i] == "train" else "train"
    errors, dupes = audit(rows, sides)
    assert errors and group in errors[0]


def test_byte_identical_files_across_sides_are_reported(tmp_path, data_root):
    src = data_root / "utkface_subset" / "images"
    files = sorted(src.iterdir())[:3]
    rows = [{"path": str(f), "group": f.name} for f in files] + [{"path": str(files[0]), "group": "copy"}]
    errors, dupes = audit(rows, ["train", "train", "train", "val"])
    assert errors == [] and dupes == [(str(files[0]), str(files[0]))]


def test_mask_contest_reader_on_a_built_layout(tmp_path):
    from PIL import Image

    people = {"000001_female_Asian_45": ["mask1.jpg", "mask2.jpeg", "mask3.png", "mask4.jpg", "mask5.jpg",
                                         "incorrect_mask.jpg", "normal.jpg"],
              "000002_male_Asian_61": ["mask1.jpg", "incorrect_mask.png", "normal.jpeg"]}
    for person, files in people.items():
        (tmp_path / "train" / person).mkdir(parents=True)
        for f in files:
            Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "train" / person / f)
    d = DataSection(root=str(tmp_path), sources=[{"type": "mask_contest", "name": "contest", "path": "train"}],
                    target={"composite": {"mask": {"column": "mask_state", "classes": ["wear", "incorrect", "not_wear"]},
                                          "gender": {"column": "gender", "classes": ["male", "female"]},
                                          "age": {"column": "age", "bins": [30, 60]}}})
    rows = read_sources(d)
    assert len(rows) == 10
    assert Counter(r["mask_state"] for r in rows) == {"wear": 6, "incorrect": 2, "not_wear": 2}
    assert {r["group"] for r in rows} == set(people)
    rows, y, labels, _ = assign_labels(rows, d.target)
    assert len(labels.classes) == 18 and labels.formula == "mask*6 + gender*3 + age"
    for r, t in zip(rows, y):
        m = ["wear", "incorrect", "not_wear"].index(r["mask_state"])
        g = ["male", "female"].index(r["gender"])
        a = 0 if int(r["age"]) < 30 else 1 if int(r["age"]) < 60 else 2
        assert t == m * 6 + g * 3 + a
    (tmp_path / "train" / "badly-named").mkdir()
    with pytest.raises(FieldError) as e:
        read_sources(d)
    assert "ID_gender_race_age" in str(e.value)
