"""Several tasks, predict, evaluate and ensembles, on tiny runs trained on the real data."""
import csv
from collections import Counter
import json

import numpy as np
import pytest
from click.testing import CliRunner

from framework import api
from framework.inference.ensemble import Voting
from framework.cli import main
from framework.data.labels import LabelSet
from framework.inference.ensemble import hard_vote, soft_vote, truth_from_splits
from framework.inference.run import load_run, split_rows
from framework.inference.priors import train_counts
from tests.conftest import DATA, read_manifest, tiny_recipe

QUESTION_COLUMNS = ["path", "mask", "gender", "age", "composite", "composite_index"]


def test_soft_vote_by_hand():
    p1 = np.array([[0.6, 0.4], [0.2, 0.8]])
    p2 = np.array([[0.3, 0.7], [0.4, 0.6]])
    assert soft_vote([p1, p2], [1, 1]) == pytest.approx(np.array([[0.45, 0.55], [0.3, 0.7]]))
    assert soft_vote([p1, p2], [3, 1]) == pytest.approx(np.array([[0.525, 0.475], [0.25, 0.75]]))


def test_hard_vote_by_hand_with_ties_broken_by_mean_probability():
    a = np.array([[0.9, 0.1, 0.0], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7]])
    b = np.array([[0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])
    c = np.array([[0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.3, 0.3, 0.4]])
    assert hard_vote([a, b, c], [1, 1, 1]).tolist() == [1, 0, 2]  # majorities: 1 (b, c), 0 (a, c), 2 (all)
    # two members disagree: a 1-1 tie goes to the class with the higher mean probability
    assert hard_vote([a[:1], b[:1]], [1, 1]).tolist() == [0]  # mean: class0 0.5 > class1 0.45
    assert hard_vote([np.array([[0.4, 0.6]]), np.array([[0.9, 0.1]])], [1, 1]).tolist() == [0]  # 0.65 > 0.35
    assert hard_vote([a[:1], b[:1]], [1, 2]).tolist() == [1]  # weights decide before probabilities


def test_the_18_class_label_codec_by_hand():
    """The contest's composite: index = mask*6 + gender*3 + age, worked out by hand, both ways; marginals of the
    composite probabilities are the sums over the other parts; the JSON form round-trips."""
    labels = LabelSet.composite({"mask": ["wear", "incorrect", "not_wear"], "gender": ["male", "female"],
                                 "age": ["<30", "30-59", "60+"]})
    assert labels.formula == "mask*6 + gender*3 + age" and len(labels.classes) == 18
    # (mask, gender, age) -> index: wear/male/<30 = 0, incorrect/male/60+ = 6+0+2 = 8,
    # not_wear/female/30-59 = 12+3+1 = 16, not_wear/female/60+ = 17
    codes = labels.encode([np.array([0, 1, 2, 2]), np.array([0, 0, 1, 1]), np.array([0, 2, 1, 2])])
    assert codes.tolist() == [0, 8, 16, 17]
    assert [labels.classes[c] for c in codes] == ["wear/male/<30", "incorrect/male/60+", "not_wear/female/30-59",
                                                  "not_wear/female/60+"]
    assert labels.encode([1, 1, 0]) == 9 and labels.encode([1, -1, 0]) == -1  # a missing part: no label
    parts = labels.decode(np.array([0, 8, 16, 17, 9, -1]))
    assert parts["mask"].tolist() == [0, 1, 2, 2, 1, -1]
    assert parts["gender"].tolist() == [0, 0, 1, 1, 1, -1]
    assert parts["age"].tolist() == [0, 2, 1, 2, 0, -1]
    every = np.arange(18)
    assert labels.encode(list(labels.decode(every).values())).tolist() == every.tolist()
    probs = np.zeros((1, 18))
    probs[0, [9, 10, 0]] = [0.5, 0.3, 0.2]  # incorrect/female/<30, incorrect/female/30-59, wear/male/<30
    m = labels.marginals(probs)
    assert m["mask"].tolist() == [[0.2, 0.8, 0.0]]
    assert m["gender"].tolist() == [[0.2, 0.8]]
    assert np.allclose(m["age"], [[0.7, 0.3, 0.0]])
    assert LabelSet.from_json(labels.to_json()) == labels
    assert labels.part_names("incorrect/male/60+") == {"mask": "incorrect", "gender": "male", "age": "60+"}
    slashed = LabelSet.composite({"mask": ["wear", "n/a"], "side": ["l/r", "top"]})  # class names with a '/'
    assert slashed.part_names(slashed.classes[3]) == {"mask": "n/a", "side": "top"}


def _mixed_manifest(path, per_class=8):
    """Mask rows (mask_state only) and UTKFace rows (gender and age only) in one manifest of real images."""
    rows, taken = [], {}
    for r in read_manifest("maskedfacenet_maskon"):
        if taken.get(r["mask_state"], 0) < per_class:
            taken[r["mask_state"]] = taken.get(r["mask_state"], 0) + 1
            rows.append([DATA / "maskedfacenet_maskon" / r["path"], r["mask_state"], "", "", r["group"]])
    for r in read_manifest("utkface_subset"):
        if r["label"] and taken.get(r["label"], 0) < per_class:
            taken[r["label"]] = taken.get(r["label"], 0) + 1
            rows.append([DATA / "utkface_subset" / r["path"], "", r["gender"], r["age"], r["group"]])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "mask_state", "gender", "age", "group"])
        w.writerows(rows)
    return path


TASKS = {"mask": {"column": "mask_state", "classes": ["wear", "incorrect", "not_wear"]},
         "gender": {"column": "gender", "classes": ["male", "female"]},
         "age": {"column": "age", "bins": [30, 60]}}


def _mixed_recipe(tmp_path, tasks, name="mixed.yaml", **extra):
    _mixed_manifest(tmp_path / "mixed.csv")
    path = tiny_recipe(tmp_path, data={"sources": [{"type": "csv", "allow_outside_root": True,
                                                    "name": "mixed", "manifest": "mixed.csv",
                                                    "group_column": "group"}], "target": None},
                       tasks=tasks, train={"epochs": 1, "batch_size": 8, "num_workers": 0}, **extra)
    return path.rename(tmp_path / name)


@pytest.fixture(scope="module")
def multitask_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mt")
    return api.run(_mixed_recipe(tmp, TASKS), name="three-heads", log=lambda *_: None)


def test_multitask_run_reports_per_task_metrics(multitask_run):
    records = [json.loads(x) for x in (multitask_run / "metrics.jsonl").read_text().splitlines()]
    val = records[-1]["val"]
    assert set(val["tasks"]) == {"mask", "gender", "age"}
    summary = json.loads((multitask_run / "summary.json").read_text())
    for task, counts in {"mask": 24, "gender": 48, "age": 48}.items():
        support = sum(m["support"] for m in val["tasks"][task]["per_class"].values())
        train = sum(summary["counts"]["train"][task].values())
        assert support + train == counts  # every labelled image counted once, on its side
    assert "composite" not in val  # no image has all three labels
    assert val["macro_f1"] == pytest.approx(np.mean([val["tasks"][t]["macro_f1"] for t in TASKS]))


def test_predict_writes_the_documented_columns_and_lists_unreadable_images(multitask_run, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for r in read_manifest("utkface_subset")[:5]:
        (images / r["path"].split("/")[-1]).write_bytes((DATA / "utkface_subset" / r["path"]).read_bytes())
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "preds.csv"
    result = CliRunner().invoke(main, ["predict", str(multitask_run), "--images", str(images), "--out", str(out),
                                       "--tta", "hflip", "--proba"])
    assert result.exit_code == 0, result.output
    assert "1 unreadable image" in result.output
    rows = list(csv.DictReader(open(out, encoding="utf-8")))
    assert len(rows) == 5
    assert list(rows[0])[:6] == QUESTION_COLUMNS
    classes = {"mask": TASKS["mask"]["classes"], "gender": ["male", "female"], "age": ["<30", "30-59", "60+"]}
    for r in rows:
        idx = [classes[q].index(r[q]) for q in ("mask", "gender", "age")]
        assert int(r["composite_index"]) == idx[0] * 6 + idx[1] * 3 + idx[2]
        assert r["composite"] == f"{r['mask']}/{r['gender']}/{r['age']}"
        assert sum(float(r[f"gender:{c}"]) for c in classes["gender"]) == pytest.approx(1, abs=1e-5)
    failed = list(csv.DictReader(open(tmp_path / "preds.failed.csv", encoding="utf-8")))
    assert failed[0]["path"].endswith("broken.jpg")


@pytest.mark.slow
def test_composite_head_and_several_heads_give_the_same_prediction_format(tmp_path):
    utk = [r for r in read_manifest("utkface_subset") if r["label"]]
    picked, taken = [], {}
    for r in utk:
        if taken.get(r["label"], 0) < 6:
            taken[r["label"]] = taken.get(r["label"], 0) + 1
            picked.append(r)
    with open(tmp_path / "utk.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "gender", "age", "group"])
        w.writerows([[DATA / "utkface_subset" / r["path"], r["gender"], r["age"], r["group"]] for r in picked])
    source = [{"type": "csv", "allow_outside_root": True,
               "name": "utk", "manifest": "utk.csv", "group_column": "group"}]
    parts = {"gender": {"column": "gender", "classes": ["male", "female"]}, "age": {"column": "age", "bins": [30, 60]}}
    one = tiny_recipe(tmp_path, data={"sources": source, "target": {"composite": parts}},
                      train={"epochs": 1, "batch_size": 8, "num_workers": 0})
    one_run = api.run(one, name="one-head", log=lambda *_: None)
    two = tiny_recipe(tmp_path, data={"sources": source, "target": None}, tasks=parts,
                      train={"epochs": 1, "batch_size": 8, "num_workers": 0})
    two_run = api.run(two, name="two-heads", log=lambda *_: None)
    headers = []
    for run_dir in (one_run, two_run):
        out = tmp_path / f"{run_dir.name}.csv"
        api.predict(run_dir, tmp_path / "utk.csv", out=out)
        rows = list(csv.DictReader(open(out, encoding="utf-8")))
        headers.append(list(rows[0]))
        for r in rows:
            assert int(r["composite_index"]) == ["male", "female"].index(r["gender"]) * 3 + \
                ["<30", "30-59", "60+"].index(r["age"])
    assert headers[0] == headers[1] == ["path", "gender", "age", "composite", "composite_index"]
    # the composite head's labels ("female/30-59") read into the same parts as the two heads' own columns
    loaded = [load_run(one_run), load_run(two_run)]
    for side in ("train", "val"):
        one_rows, two_rows = (split_rows(r, side) for r in loaded)
        assert one_rows and [r["path"] for r in one_rows] == [r["path"] for r in two_rows]
        assert [(r["gender"], r["age"]) for r in one_rows] == [(r["gender"], r["age"]) for r in two_rows]
        assert [r["label"] for r in one_rows] == [f"{r['gender']}/{r['age']}" for r in two_rows]
    assert train_counts(loaded[0]) == train_counts(loaded[1])
    assert sum(train_counts(loaded[0])["age"].values()) == len(split_rows(loaded[0], "train"))
    paths, truth = truth_from_splits(loaded, loaded[0].questions())
    assert set(truth) == {"gender", "age"} and len(paths) == len(split_rows(loaded[1], "val"))
    # evaluate's file gives the answer its report scores (the composite head's joint choice) and the true labels
    result = api.evaluate(one_run, tmp_path / "utk.csv", out=tmp_path / "ev")
    rows = list(csv.DictReader(open(tmp_path / "ev" / "predictions.csv", encoding="utf-8")))
    assert {"gender_true", "age_true"} <= set(rows[0]) and all(r["gender_true"] in ("male", "female") for r in rows)
    predicted = {k: v["predicted"] for k, v in json.loads((tmp_path / "ev" / "metrics.json").read_text())
                 ["distribution"]["label"].items()}
    assert {k: v for k, v in predicted.items() if v} == dict(Counter(r["composite"] for r in rows))
    assert result["metrics"]["accuracy"] == pytest.approx(
        np.mean([r["composite"] == f"{r['gender_true']}/{r['age_true']}" for r in rows]))
    assert (truth["age"] >= 0).all() and truth["age"].max() <= 2


def test_evaluate_scores_the_tasks_a_set_has_labels_for(multitask_run, tmp_path):
    """A mask-only manifest for a mask + gender + age model: the mask task is scored, the others are named as not
    scored (training handles exactly such missing labels)."""
    from tests.conftest import tiny_manifest

    mask_only = tiny_manifest(tmp_path / "mask_only.csv", per_class=3)  # path, mask_state, group
    result = CliRunner().invoke(main, ["evaluate", str(multitask_run), "--csv", str(mask_only), "--out",
                                       str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert "not scored (this data has no labels for them): gender, age" in result.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())["metrics"]
    assert set(metrics["tasks"]) == {"mask"} and metrics["macro_f1"] == metrics["tasks"]["mask"]["macro_f1"]


def test_evaluate_on_a_labelled_csv_writes_report_pngs_and_distribution(multitask_run, tmp_path):
    from PIL import Image

    labelled = _mixed_manifest(tmp_path / "other.csv", per_class=3)
    result = CliRunner().invoke(main, ["evaluate", str(multitask_run), "--csv", str(labelled),
                                       "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert "[mask] accuracy" in result.output and "class distribution (true -> predicted)" in result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 9 + 18
    for task in ("mask", "gender", "age"):
        assert Image.open(tmp_path / "eval" / f"confusion_{task}.png").size[0] > 50
        dist = metrics["distribution"][task]
        assert sum(d["true"] for d in dist.values()) == sum(d["predicted"] for d in dist.values())
    assert sum(d["true"] for d in metrics["distribution"]["mask"].values()) == 9


@pytest.mark.slow
def test_per_task_runs_combine_into_the_composite_answer(tmp_path):
    runs = [api.run(_mixed_recipe(tmp_path, {t: TASKS[t]}, name=f"{t}.yaml"), name=f"{t}-only",
                    log=lambda *_: None) for t in TASKS]
    out = tmp_path / "ens.csv"
    result = CliRunner().invoke(main, ["ensemble", *map(str, runs), "--method", "soft", "--csv",
                                       str(tmp_path / "mixed.csv"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "composite = mask x gender x age" in result.output
    rows = list(csv.DictReader(open(out, encoding="utf-8")))
    assert list(rows[0]) == QUESTION_COLUMNS and len(rows) == 72  # 24 mask + 48 UTKFace images
    # each question's answer is its own member's prediction
    for run_dir, q in zip(runs, TASKS):
        api.predict(run_dir, tmp_path / "mixed.csv", out=tmp_path / f"{q}.csv")
        alone = list(csv.DictReader(open(tmp_path / f"{q}.csv", encoding="utf-8")))
        assert [r[q] for r in alone] == [r[q] for r in rows]
    # each member dropped the rows without its label, so their validation sets differ: no shared score
    assert "validation macro-F1" not in result.output


@pytest.mark.slow
def test_seeds_ensemble_by_hard_and_soft_voting_with_validation_weights(tmp_path):
    path = tiny_recipe(tmp_path, train={"epochs": 1, "batch_size": 8, "num_workers": 0})
    runs = [api.run(path, [f"train.seed={s}"], name=f"seed{s}", log=lambda *_: None) for s in (1, 2, 3)]
    for method in ("hard", "soft"):
        result = api.ensemble(runs, tmp_path / "tiny.csv", out=tmp_path / f"{method}.csv",
                              voting=Voting(method, "val:macro_f1"))
        scores = [json.loads((r / "summary.json").read_text())["best_value"] for r in runs]
        assert result["weights"] == pytest.approx(scores)
        table = result["validation"]
        assert set(table) == {"seed1", "seed2", "seed3", "ensemble"}
        assert all(0 <= row["label"] <= 1 for row in table.values())


def test_evaluate_leaves_out_labels_the_run_does_not_have(tmp_path):
    """A wear / not_wear model scored on a three-class set is scored on its two classes; the third is counted."""
    from tests.conftest import tiny_manifest, tiny_recipe

    recipe = tiny_recipe(tmp_path, data={"sources": [{"type": "csv", "allow_outside_root": True,
                                                      "name": "maskon", "manifest": "tiny.csv",
                                                      "group_column": "group",
                                                      "filter": {"mask_state": ["wear", "not_wear"]}}],
                                         "target": {"column": "mask_state", "classes": ["wear", "not_wear"]}},
                         train={"epochs": 1, "batch_size": 8, "num_workers": 0})
    run = api.run(recipe, name="two", log=lambda *_: None)
    three = tiny_manifest(tmp_path / "three.csv", per_class=4)
    result = CliRunner().invoke(main, ["evaluate", str(run), "--csv", str(three), "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    assert "left out, not classes of this run: incorrect 4" in result.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["images"] == 8
    assert set(metrics["distribution"]["label"]) == {"wear", "not_wear"}


def test_eval_tta_validates_on_the_mirror_average_and_is_the_runs_default_for_predict(tmp_path):
    """With eval.tta: hflip the run's validation figures (and so its `best`) are those of the mirror-averaged
    outputs, and predict / evaluate use them unless told `--tta none`."""
    from framework.inference import predict as P, run as R
    from framework.folders import RunFolder
    from framework.engine.metrics import confusion

    path = tiny_recipe(tmp_path, eval={"tta": "hflip"}, train={"epochs": 1, "batch_size": 8, "num_workers": 0})
    run = api.run(path, name="tta", log=lambda *_: None)
    with open(run / "split.csv", encoding="utf-8") as f:
        val = [r for r in csv.DictReader(f) if r["split"] == "val"]
    loaded = R.load_run(run)
    classes = loaded.labels["label"].classes
    paths, truth = [r["path"] for r in val], np.array([classes.index(r["label"]) for r in val])
    default = P.predict_tasks(loaded, paths).probs
    hflip = P.predict_tasks(loaded, paths, "hflip").probs
    plain = P.predict_tasks(loaded, paths, "none").probs
    assert np.array_equal(default["label"], hflip["label"])
    assert np.abs(default["label"] - plain["label"]).max() > 1e-4  # the mirror image changes the outputs
    recorded = RunFolder(run).kept_record(1)["val"]["confusion"]
    assert confusion(truth, default["label"].argmax(1), len(classes)).tolist() == recorded
    result = CliRunner().invoke(main, ["predict", str(run), "--csv", str(tmp_path / "tiny.csv"), "--tta", "none",
                                       "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output


def test_evaluations_of_two_sets_with_one_file_name_get_two_folders(tmp_path):
    """`--csv a/manifest.csv` and `--csv b/manifest.csv` wrote to one default folder and overwrote each other."""
    from framework.inference.evaluate import default_folder

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, b = default_folder(tmp_path / "a" / "manifest.csv"), default_folder(tmp_path / "b" / "manifest.csv")
    assert a != b and a.startswith("manifest-") and b.startswith("manifest-")
    assert default_folder(tmp_path / "a" / ".." / "a" / "manifest.csv") == a  # one file, one folder
