"""Age as a number: regression, ordinal and anomaly tasks on UTKFace, reported with the same band metrics."""
import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from framework import api
from framework.inference.ensemble import Voting
from framework.cli import main
from framework.review.compare import sheet
from framework.tasks import best_threshold, head_class
from tests.conftest import DATA, read_manifest, tiny_recipe

FAST = {"epochs": 2, "batch_size": 16, "num_workers": 0, "optimizer": {"name": "adamw", "lr": 0.003}}


def test_heads_by_hand():
    reg = head_class("regression")("age", ["<30", "30-59", "60+"], [30, 60])
    assert reg.bands(torch.tensor([12.0, 30.0, 59.9, 60.0, float("nan")])).tolist() == [0, 1, 1, 2, -1]
    assert reg.predict(torch.tensor([[29.0], [61.0]])).tolist() == [0, 2]
    ordinal = head_class("ordinal")("age", ["<30", "30-59", "60+"])
    p = ordinal.probs(torch.tensor([[5.0, -5.0], [5.0, 5.0], [-5.0, -5.0]]))  # logits of "above band 0/1"
    assert p.argmax(1).tolist() == [1, 2, 0] and p.sum(1) == pytest.approx(torch.ones(3), abs=1e-6)
    target = torch.tensor([2.0, 0.0])
    assert ordinal.loss(torch.tensor([[9.0, 9.0], [-9.0, -9.0]]), target, None) < 0.01  # right answers, low loss
    anomaly = head_class("anomaly")("age", ["not 60+", "60+"], threshold=0.2)
    assert anomaly.predict(torch.tensor([[-1.0], [-2.0]])).tolist() == [1, 0]  # sigmoid 0.27 > 0.2 > 0.12
    t, f1 = best_threshold([0.9, 0.8, 0.3, 0.2, 0.1], [1, 1, 0, 1, 0])
    assert 0.1 < t < 0.2 and f1 == pytest.approx(2 * 3 / (4 + 3))


def test_heads_keep_their_own_state_and_old_checkpoints_still_load():
    """One `state()` per head (threshold, scaling, fitted distribution) in a checkpoint's `head_state`; checkpoints
    written before (`thresholds`, `targets`, and a one_class `head_state` without its threshold) load the same."""
    from framework.tasks import head_states, load_head_states

    def heads():
        return {"old": head_class("anomaly")("old", ["not 60+", "60+"]),
                "years": head_class("regression")("years", ["<30", "30-59", "60+"], [30, 60]),
                "normal": head_class("one_class")("normal", ["not 60+", "60+"]),
                "band": head_class("classification")("band", ["<30", "30-59", "60+"])}

    trained = heads()
    trained["old"].threshold, trained["normal"].threshold = 0.37, 0.81
    trained["years"].center, trained["years"].scale = 41.5, 12.25
    trained["normal"].fit_normal(np.random.default_rng(0).normal(size=(40, 32)))
    states = head_states(trained)
    assert set(states) == {"old", "years", "normal"}  # a classification head learns nothing outside its weights
    assert states["old"] == {"threshold": 0.37} and states["years"] == {"center": 41.5, "scale": 12.25}
    assert states["normal"]["threshold"] == 0.81 and len(states["normal"]["mean"]) == 32
    legacy = {"thresholds": {"old": 0.37, "normal": 0.81}, "targets": {"years": [41.5, 12.25]},
              "head_state": {"normal": {k: states["normal"][k] for k in ("mean", "precision")}}}
    for checkpoint in ({"head_state": states}, legacy):
        loaded = heads()
        load_head_states(loaded, checkpoint)
        assert head_states(loaded) == states
        out = torch.randn(4, 32)
        assert torch.equal(loaded["normal"].probs(out), trained["normal"].probs(out))
        assert torch.equal(loaded["years"].value(torch.ones(2, 1)), torch.full((2,), 41.5 + 12.25))
    assert loaded["band"].value(torch.ones(2, 3)) is None  # a class head predicts bands only


def _utk_manifest(path, per_label=12):
    rows, taken = [], {}
    for r in read_manifest("utkface_subset"):
        if r["label"] and taken.get(r["label"], 0) < per_label:
            taken[r["label"]] = taken.get(r["label"], 0) + 1
            rows.append([DATA / "utkface_subset" / r["path"], r["age"], r["age_band"], r["group"]])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "age", "age_band", "group"])
        w.writerows(rows)
    return path


def _age_recipe(tmp_path, kind_spec, name):
    _utk_manifest(tmp_path / "utk.csv")
    path = tiny_recipe(tmp_path, data={"sources": [{"type": "csv", "allow_outside_root": True,
                                                    "name": "utk", "manifest": "utk.csv",
                                                    "group_column": "group"}], "target": None},
                       tasks={"age": {"column": "age", "bins": [30, 60], **kind_spec}},
                       validation={"type": "holdout", "ratio": 0.25, "stratify": "age_band"}, train=FAST)
    return path.rename(tmp_path / f"{name}.yaml")


@pytest.fixture(scope="module")
def age_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("age")
    kinds = {"classification": {}, "regression": {"kind": "regression"}, "ordinal": {"kind": "ordinal"},
             "anomaly": {"kind": "anomaly", "anomaly": "60+"}}
    return tmp, {k: api.run(_age_recipe(tmp, spec, k), name=k, log=lambda *_: None) for k, spec in kinds.items()}


@pytest.mark.slow
def test_classification_regression_ordinal_report_the_same_band_metrics(age_runs):
    tmp, runs = age_runs
    records = {k: [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()][-1]["val"]
               for k, r in runs.items()}
    for kind in ("classification", "regression", "ordinal"):
        assert list(records[kind]["per_class"]) == ["<30", "30-59", "60+"]
        assert sum(map(sum, records[kind]["confusion"])) == 18  # the same 18 validation images (72 x 0.25)
    assert records["regression"]["mae"] > 0  # years
    cols, rows = sheet([runs["classification"], runs["regression"], runs["ordinal"]])
    assert {"val/macro_f1", "val/mae"} <= set(cols) and len(rows) == 3  # side by side in `recipe compare`
    with open(runs["regression"] / "split.csv", encoding="utf-8") as f:
        assert {r["split"] for r in csv.DictReader(f)} == {"train", "val"}


@pytest.mark.slow
def test_moving_the_cut_from_60_to_58_changes_the_bands_without_retraining(age_runs):
    tmp, runs = age_runs
    before = runs["regression"] / "checkpoints" / "best.pt"
    mtime = before.stat().st_mtime_ns
    results = {}
    for bins in ("[30, 60]", "[30, 58]"):
        result = CliRunner().invoke(main, ["evaluate", str(runs["regression"]), "--csv", str(tmp / "utk.csv"),
                                           "--set", f"tasks.age.bins={bins}", "--out", str(tmp / f"ev{bins[5:7]}")])
        assert result.exit_code == 0, result.output
        results[bins] = json.loads((tmp / f"ev{bins[5:7]}" / "metrics.json").read_text())
    assert list(results["[30, 60]"]["distribution"]["age"]) == ["<30", "30-59", "60+"]
    assert list(results["[30, 58]"]["distribution"]["age"]) == ["<30", "30-57", "58+"]
    true60 = {k: v["true"] for k, v in results["[30, 60]"]["distribution"]["age"].items()}
    true58 = {k: v["true"] for k, v in results["[30, 58]"]["distribution"]["age"].items()}
    ages = [int(r["age"]) for r in csv.DictReader(open(tmp / "utk.csv", encoding="utf-8"))]
    assert true58["58+"] == sum(a >= 58 for a in ages) and true60["60+"] == sum(a >= 60 for a in ages)
    assert before.stat().st_mtime_ns == mtime  # nothing was retrained
    bad = CliRunner().invoke(main, ["evaluate", str(runs["classification"]), "--csv", str(tmp / "utk.csv"),
                                    "--set", "tasks.age.bins=[30, 58]"])
    assert bad.exit_code == 2 and "only regression tasks" in bad.output


@pytest.mark.slow
def test_anomaly_task_reports_its_threshold_and_the_60plus_f1(age_runs):
    tmp, runs = age_runs
    val = [json.loads(x) for x in (runs["anomaly"] / "metrics.jsonl").read_text().splitlines()][-1]["val"]
    assert list(val["per_class"]) == ["not 60+", "60+"] and 0 < val["threshold"] < 1
    assert 0 <= val["per_class"]["60+"]["f1"] <= 1
    state = torch.load(runs["anomaly"] / "checkpoints" / "best.pt", weights_only=True)
    assert 0 < state["head_state"]["age"]["threshold"] < 1
    out = api.predict(runs["anomaly"], tmp / "utk.csv", out=tmp / "anom.csv")
    rows = list(csv.DictReader(open(out["out"], encoding="utf-8")))
    assert {r["age"] for r in rows} <= {"not 60+", "60+"}
    for source in ([], ["--csv", str(tmp / "utk.csv")]):  # its own split, and a CSV of ages (read as the recipe reads)
        result = CliRunner().invoke(main, ["evaluate", str(runs["anomaly"]), *source, "--out", str(tmp / "ev-anom")])
        assert result.exit_code == 0, result.output
        report = json.loads((tmp / "ev-anom" / "metrics.json").read_text())
        assert list(report["distribution"]["age"]) == ["not 60+", "60+"]
    true = {k: v["true"] for k, v in report["distribution"]["age"].items()}
    ages = [int(r["age"]) for r in csv.DictReader(open(tmp / "utk.csv", encoding="utf-8"))]
    assert true == {"not 60+": sum(a < 60 for a in ages), "60+": sum(a >= 60 for a in ages)}


@pytest.mark.slow
def test_regression_predictions_and_ensembles_use_bands(age_runs):
    tmp, runs = age_runs
    out = api.predict(runs["regression"], tmp / "utk.csv", out=tmp / "reg.csv")
    rows = list(csv.DictReader(open(out["out"], encoding="utf-8")))
    assert {r["age"] for r in rows} <= {"<30", "30-59", "60+"}
    result = api.ensemble([runs["classification"], runs["regression"], runs["ordinal"]], tmp / "utk.csv",
                          out=tmp / "ens.csv", voting=Voting("hard"))
    assert set(result["validation"]) == {"classification", "regression", "ordinal", "ensemble"}
    assert np.isfinite(result["validation"]["ensemble"]["age"])


@pytest.mark.slow
def test_a_regression_head_among_classification_heads(tmp_path):
    from tests.test_predict import _mixed_recipe

    tasks = {"mask": {"column": "mask_state", "classes": ["wear", "incorrect", "not_wear"]},
             "gender": {"column": "gender", "classes": ["male", "female"]},
             "age": {"column": "age", "bins": [30, 60], "kind": "regression"}}
    run_dir = api.run(_mixed_recipe(tmp_path, tasks), name="mixed-kinds", log=lambda *_: None)
    val = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]["val"]
    assert set(val["tasks"]) == {"mask", "gender", "age"} and val["tasks"]["age"]["mae"] > 0
    out = api.predict(run_dir, tmp_path / "mixed.csv", out=tmp_path / "p.csv")
    rows = list(csv.DictReader(open(out["out"], encoding="utf-8")))
    assert list(rows[0])[:6] == ["path", "mask", "gender", "age", "composite", "composite_index"]


@pytest.mark.slow
def test_regression_members_average_their_numbers(age_runs):
    tmp, runs = age_runs
    other = api.run(tmp / "regression.yaml", ["train.seed=5"], name="regression-seed5", log=lambda *_: None)
    outs = [api.predict(r, tmp / "utk.csv", out=tmp / f"{r.name}.csv")
            for r in (runs["regression"], other)]
    numbers = [np.array([float(r["age_value"]) for r in csv.DictReader(open(o["out"], encoding="utf-8"))])
               for o in outs]
    api.ensemble([runs["regression"], other], tmp / "utk.csv", out=tmp / "mean.csv", voting=Voting("hard"))
    bands = [r["age"] for r in csv.DictReader(open(tmp / "mean.csv", encoding="utf-8"))]
    mean = (numbers[0] + numbers[1]) / 2
    expected = ["<30" if m < 30 else "30-59" if m < 60 else "60+" for m in mean]
    agree = np.mean([a == b for a, b in zip(bands, expected)])
    assert agree > 0.97  # equal up to the 3-decimal rounding of the CSV at a cut point


MIXED = {"mask": {"column": "mask_state", "classes": ["wear", "incorrect", "not_wear"]},
         "gender": {"column": "gender", "classes": ["male", "female"]},
         "age": {"column": "age", "bins": [30, 60], "kind": "regression"}}


def test_every_head_of_a_multi_task_run_starts_at_a_comparable_loss(tmp_path):
    """Age in years would start near 40 against about 1 for the class heads and drive the shared backbone alone;
    standardised by the training split it starts within a factor of 10 of the others."""
    from framework.build import build_run
    from tests.test_predict import _mixed_recipe

    resolved = api.validate(_mixed_recipe(tmp_path, MIXED))
    b = build_run(resolved.recipe, resolved.plan, tmp_path / "r", [])
    ages = np.array([float(y[2]) for y in b.loaders.train_ds.labels])
    ages = ages[~np.isnan(ages)]
    age = b.heads["age"]
    assert age.center == pytest.approx(ages.mean()) and age.scale == pytest.approx(ages.std())
    images, labels, _ = next(iter(b.train_loader))
    with torch.no_grad():
        logits = b.model(images)
        losses = {t: float(h.loss(logits[t], labels[:, j], b.loss_fn.losses[t]))
                  for j, (t, h) in enumerate(b.heads.items())}
    assert max(losses.values()) < 10 * min(losses.values()), losses


@pytest.mark.slow
def test_a_regression_runs_scaling_is_saved_and_predictions_are_in_years(age_runs):
    from framework.inference.run import load_run

    tmp, runs = age_runs
    state = torch.load(runs["regression"] / "checkpoints" / "best.pt", weights_only=True)
    center, scale = state["head_state"]["age"]["center"], state["head_state"]["age"]["scale"]
    assert 20 < center < 70 and 5 < scale < 40  # the training split's mean and spread of ages, in years
    head = load_run(runs["regression"]).heads["age"]
    assert (head.center, head.scale) == (center, scale)
    out = api.predict(runs["regression"], tmp / "utk.csv", out=tmp / "years.csv")
    values = [float(r["age_value"]) for r in csv.DictReader(open(out["out"], encoding="utf-8"))]
    assert 10 < np.mean(values) < 80  # years, not z-scores


@pytest.mark.slow
def test_evaluate_moves_the_cut_on_the_runs_own_validation_split(age_runs):
    """split.csv keeps each image's age, so `recipe evaluate RUN --set tasks.age.bins=...` re-bands the run's own
    validation images without any other file."""
    tmp, runs = age_runs
    run = runs["regression"]
    rows = [r for r in csv.DictReader(open(run / "split.csv", encoding="utf-8")) if r["split"] == "val"]
    ages = [float(r["age_value"]) for r in rows]
    assert rows and all(r["age"] in ("<30", "30-59", "60+") for r in rows)
    result = CliRunner().invoke(main, ["evaluate", str(run), "--set", "tasks.age.bins=[30, 58]"])
    assert result.exit_code == 0 and "its validation split" in result.output, result.output
    metrics = json.loads((run / "evaluations" / "validation" / "metrics.json").read_text())
    true = {k: v["true"] for k, v in metrics["distribution"]["age"].items()}
    assert metrics["images"] == len(rows) and true["58+"] == sum(a >= 58 for a in ages)
    assert true["30-57"] == sum(30 <= a < 58 for a in ages)


@pytest.mark.slow
def test_evaluate_reports_the_mean_absolute_error_of_regression_and_ordinal_runs(age_runs):
    tmp, runs = age_runs
    truth = {str(r["path"]): float(r["age"]) for r in csv.DictReader(open(tmp / "utk.csv", encoding="utf-8"))}
    for kind, how in (("regression", "the predicted number"), ("ordinal", "expected value")):
        out = tmp / f"mae-{kind}"
        result = CliRunner().invoke(main, ["evaluate", str(runs[kind]), "--csv", str(tmp / "utk.csv"), "--out", str(out)])
        assert result.exit_code == 0 and "[age] MAE " in result.output and how in result.output, result.output
        mae = json.loads((out / "metrics.json").read_text())["mae"]["age"]
        assert mae["images"] == len(truth) and set(mae["per_band"]) <= {"<30", "30-59", "60+"}
        if kind == "regression":  # the figure is the mean distance of the written numbers from the true ages
            rows = list(csv.DictReader(open(out / "predictions.csv", encoding="utf-8")))
            by_hand = np.mean([abs(float(r["age_value"]) - truth[r["path"]]) for r in rows])
            assert mae["mae"] == pytest.approx(by_hand, abs=0.01)


@pytest.mark.slow
def test_a_one_class_anomaly_task_learns_the_normal_images_only_and_resumes_exactly(tmp_path):
    """kind one_class: the normal (not 60+) training images' feature distribution is fitted before each
    validation, the threshold chosen on validation, both saved; no 60+ training image is used; predict scores
    with them; 1 epoch + resume gives the same figures as 2 epochs straight."""
    import shutil

    from framework.inference.run import load_run

    path = _age_recipe(tmp_path, {"kind": "one_class", "anomaly": "60+"}, "one_class")
    run = api.run(path, ["checkpoint.every=1", "train.finetune.freeze_bn=true"], name="oc", log=lambda *_: None)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    normal = state["head_state"]["age"]
    assert len(normal["mean"]) == 32 and 0 < normal["threshold"] < 1
    head = load_run(run).heads["age"]
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert head.threshold == best["head_state"]["age"]["threshold"]
    assert head.mean.tolist() == best["head_state"]["age"]["mean"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert "threshold" in records[-1]["val"] and 0 <= records[-1]["val"]["per_class"]["60+"]["f1"] <= 1
    out = api.predict(run, tmp_path / "utk.csv", out=tmp_path / "oc.csv", proba=True)
    rows = list(csv.DictReader(open(out["out"], encoding="utf-8")))
    n = sum(1 for _ in csv.DictReader(open(tmp_path / "utk.csv", encoding="utf-8")))
    assert {r["age"] for r in rows} == {"not 60+", "60+"} and len(rows) == n
    resumed = shutil.copytree(run, tmp_path / "resumed")
    shutil.copy(resumed / "checkpoints" / "epoch_0001.pt", resumed / "checkpoints" / "last.pt")
    api.run(resume=resumed, log=lambda *_: None)
    again = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert again[-1]["val"] == records[-1]["val"]
    assert torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["head_state"] == state["head_state"]


def test_the_one_class_score_grows_with_the_distance_from_the_normal_images():
    head = head_class("one_class")("age", ["not 60+", "60+"])
    rng = np.random.default_rng(0)
    head.fit_normal(rng.normal(0, 1, (400, 32)))
    near, far = torch.zeros(1, 32), torch.full((1, 32), 3.0)
    assert float(head.score(near)) < 0.2 < 0.9 < float(head.score(far))
    head.threshold = 0.5
    assert head.predict(torch.cat([near, far])).tolist() == [0, 1]


def test_a_standardised_regression_loss_is_the_loss_in_years_divided_by_the_scale():
    """Standardising changes the loss's size, not what it is: smooth L1's beta stays in years (5), so the same
    errors are quadratic or linear as before, and the optimum is the same."""
    from framework.losses import build_loss
    from framework.recipe.schema import LossSpec

    head = head_class("regression")("age", ["<30", "30-59", "60+"], [30, 60])
    head.center, head.scale = 40.0, 16.0
    ages = torch.tensor([20.0, 33.0, 61.0, 90.0])
    guess_years = torch.tensor([23.0, 45.0, 61.5, 70.0])
    out = ((guess_years - head.center) / head.scale)[:, None]
    for name in ("smooth_l1", "l1"):
        fn = build_loss(LossSpec(name=name), 1, [])
        in_years = fn(guess_years, ages)
        assert float(head.loss(out, ages, fn)) == pytest.approx(float(in_years) / head.scale, rel=1e-5), name



@pytest.mark.slow
def test_ordinal_and_banded_class_runs_report_a_validation_mae_beside_regression(age_runs):
    """The compare sheet shows an MAE for every age run: regression's predicted number, and the expected value
    (band probabilities x each band's mean training age) for ordinal and banded classification."""
    tmp, runs = age_runs
    for kind in ("classification", "ordinal", "regression"):
        val = [json.loads(x) for x in (runs[kind] / "metrics.jsonl").read_text().splitlines()][-1]["val"]
        assert 2 < val["mae"] < 40, (kind, val.get("mae"))
    cols, rows = sheet([runs[k] for k in ("classification", "ordinal", "regression")])
    assert "val/mae" in cols and all(r["val/mae"] is not None for r in rows)
