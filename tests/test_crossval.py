"""k-fold runs scored as one validation set: every item once, by the fold model that did not train on it."""
import csv
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from framework.cli import main
from framework.folders import RunFolder
from tests.conftest import REPO, tiny_recipe


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    """Three fold runs of the tiny recipe, trained once with `recipe run --all-folds` (output kept)."""
    tmp = tmp_path_factory.mktemp("cv")
    path = tiny_recipe(tmp, validation={"type": "kfold", "k": 3, "stratify": True, "group_by": "group"},
                       train={"epochs": 2, "batch_size": 8, "num_workers": 0})
    result = CliRunner().invoke(main, ["run", str(path), "--all-folds", "--name", "tiny"])
    assert result.exit_code == 0, result.output
    return tmp / "runs", result.output


def _copy(runs, tmp_path, names=("tiny-fold0", "tiny-fold1", "tiny-fold2")):
    for n in names:
        shutil.copytree(runs / n, tmp_path / n)
    return [tmp_path / n for n in names]


@pytest.mark.slow
def test_all_folds_trains_every_fold_and_scores_them_as_one(folds):
    runs, output = folds
    names = sorted(p.name for p in runs.iterdir() if p.is_dir())
    assert names == ["tiny-fold0", "tiny-fold1", "tiny-fold2"]
    vals = []
    for n in names:
        with open(runs / n / "split.csv", encoding="utf-8") as f:
            vals.append({r["path"] for r in csv.DictReader(f) if r["split"] == "val"})
    assert not (vals[0] & vals[1]) and not (vals[1] & vals[2]) and len(set.union(*vals)) == 36

    result = json.loads((runs / "tiny-cv.json").read_text())
    val = result["val"]
    # every labelled item is scored once, and the pooled matrix is the sum of the kept epochs' matrices
    kept = [RunFolder(runs / n).kept_record(json.loads((runs / n / "summary.json").read_text())["best_epoch"])
            for n in names]
    cm = sum(np.array(k["val"]["confusion"]) for k in kept)
    assert val["confusion"] == cm.tolist() and cm.sum() == 36
    assert [p["best_epoch"] for p in result["per_fold"]] == [k["epoch"] for k in kept]
    # per-class F1 of the pooled counts, by hand (not the mean of the folds' F1)
    tp, pred, true = np.diag(cm), cm.sum(0), cm.sum(1)
    for i, c in enumerate(["wear", "incorrect", "not_wear"]):
        p = tp[i] / pred[i] if pred[i] else 0.0
        r = tp[i] / true[i]
        assert val["per_class"][c]["f1"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)
        assert val["per_class"][c]["support"] == 12
    assert "cross-validated over 3 folds" in output and "36 items" in output
    # each fold's run ends with every class's F1 at its kept epoch and the class's validation count
    for n, k in zip(names, kept):
        counts = json.loads((runs / n / "summary.json").read_text())["counts"]["val"]["label"]
        f1 = k["val"]["per_class"]
        line = f"F1 per class at epoch {k['epoch']} (validation images): " + ", ".join(
            f"{c} {f1[c]['f1']:.3f} ({counts[c]})" for c in ["wear", "incorrect", "not_wear"])
        assert line in output
    assert f"macro-F1 {val['macro_f1']:.3f}" in output and "tiny-cv.json" in output


@pytest.mark.slow
def test_crossval_command_rescored_from_the_run_folders(folds, tmp_path):
    runs, _ = folds
    out = tmp_path / "again.json"
    result = CliRunner().invoke(main, ["crossval", *map(str, sorted(runs.glob("tiny-fold*"))), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["val"] == json.loads((runs / "tiny-cv.json").read_text())["val"]


@pytest.mark.slow
def test_all_folds_run_again_keeps_the_finished_folds(folds):
    runs, _ = folds
    before = {n: (runs / n / "checkpoints" / "best.pt").stat().st_mtime_ns for n in ("tiny-fold0", "tiny-fold2")}
    scores = json.loads((runs / "tiny-cv.json").read_text())["val"]
    result = CliRunner().invoke(main, ["run", str(runs.parent / "tiny.yaml"), "--all-folds", "--name", "tiny"])
    assert result.exit_code == 0, result.output
    assert result.output.count("finished earlier with the same recipe; kept") == 3
    assert {n: (runs / n / "checkpoints" / "best.pt").stat().st_mtime_ns for n in before} == before
    assert json.loads((runs / "tiny-cv.json").read_text())["val"] == scores


def _fails(args):
    result = CliRunner().invoke(main, ["crossval", *map(str, args)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    return result.output


@pytest.mark.slow
def test_a_missing_fold_is_named_with_the_command_that_trains_it(folds, tmp_path):
    runs, _ = folds
    out = _fails([runs / "tiny-fold0", runs / "tiny-fold1"])
    assert "fold(s) 2 of 3 are missing" in out and "validation.fold=2" in out


@pytest.mark.slow
def test_a_fold_given_twice_is_refused(folds, tmp_path):
    runs, _ = folds
    shutil.copytree(runs / "tiny-fold0", tmp_path / "again-fold0")
    out = _fails([runs / "tiny-fold0", tmp_path / "again-fold0", runs / "tiny-fold1", runs / "tiny-fold2"])
    assert "fold 0 is given twice (tiny-fold0, again-fold0)" in out


@pytest.mark.slow
def test_folds_of_different_recipes_are_refused(folds, tmp_path):
    copies = _copy(folds[0], tmp_path)
    resolved = copies[1] / "recipe.resolved.yaml"
    recipe = yaml.safe_load(resolved.read_text())
    recipe["train"]["seed"] = 7
    resolved.write_text(yaml.safe_dump(recipe))
    out = _fails(copies)
    assert "not folds of one recipe" in out and "train.seed: 0 -> 7" in out


@pytest.mark.slow
def test_an_unfinished_fold_is_named_with_the_resume_command(folds, tmp_path):
    copies = _copy(folds[0], tmp_path)
    summary = json.loads((copies[2] / "summary.json").read_text())
    (copies[2] / "summary.json").write_text(json.dumps(summary | {"status": "interrupted", "epochs_done": 1}))
    out = _fails(copies)
    assert "tiny-fold2 is interrupted (epoch 1 of 2)" in out and f"recipe run --resume {copies[2]}" in out


def test_a_holdout_run_is_not_a_fold(tmp_path):
    path = tiny_recipe(tmp_path, train={"epochs": 1, "batch_size": 8, "num_workers": 0})
    assert CliRunner().invoke(main, ["run", str(path), "--name", "holdout"]).exit_code == 0
    out = _fails([tmp_path / "runs" / "holdout"])
    assert "validated by 'holdout', not by k-fold" in out and "validation: {type: kfold" in out


@pytest.mark.slow
def test_compare_shows_the_pooled_folds_as_one_more_row(folds):
    runs, _ = folds
    result = CliRunner().invoke(main, ["compare", str(runs), "--format", "csv", "--baseline", str(runs / "tiny-fold1")])
    assert result.exit_code == 0, result.output
    rows = {r["run"]: r for r in csv.DictReader(result.output.splitlines())}
    assert set(rows) == {"tiny-fold0", "tiny-fold1", "tiny-fold2", "tiny-cv (3 folds pooled)"}
    pooled = json.loads((runs / "tiny-cv.json").read_text())
    row = rows["tiny-cv (3 folds pooled)"]
    assert float(row["val/macro_f1"]) == pytest.approx(pooled["val"]["macro_f1"])
    assert float(row["val/f1/incorrect"]) == pytest.approx(pooled["val"]["per_class"]["incorrect"]["f1"])
    assert row["best_epoch"] == "" and float(row["wall_s"]) == pytest.approx(pooled["wall_seconds"])
    assert rows["tiny-fold0"]["changed"] == "validation.fold: 1 -> 0"
    assert row["changed"] == ""  # the pooled row stands for every fold: the same recipe as the baseline fold


@pytest.mark.slow
def test_errors_by_column_bins_add_up_to_the_pooled_counts(folds, tmp_path):
    """scripts/errors_by_column.py: each fold scores its own validation images; over all bins the class's found /
    false alarms / missed are exactly the cross-validation's pooled confusion matrix."""
    runs, _ = folds
    with open(runs.parent / "tiny.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    manifest = tmp_path / "sized.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], "kb"])
        w.writeheader()
        w.writerows({**r, "kb": os.path.getsize(r["path"]) / 1024} for r in rows)
    spec = importlib.util.spec_from_file_location("errors_by_column", REPO / "scripts" / "errors_by_column.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bins = module.binned(sorted(runs.glob("tiny-fold*")), manifest, "kb", [10, 20], "incorrect")
    cm = np.array(json.loads((runs / "tiny-cv.json").read_text())["val"]["confusion"])
    assert sum(b["n"] for b in bins) == 36 and sum(b["support"] for b in bins) == 12
    assert sum(b["tp"] for b in bins) == cm[1, 1]
    assert sum(b["fp"] for b in bins) == cm[:, 1].sum() - cm[1, 1]
    assert sum(b["fn"] for b in bins) == cm[1].sum() - cm[1, 1]
