"""The contest, end to end, on a folder of its shape built from real images (scripts/make_contest_fixture.py): person
folders -> validate -> a composite run and a three-head run -> evaluate (own split, a labelled CSV) -> the submission
file -> an ensemble of the two -> the experiment sheet. One answer everywhere: the composite's joint choice."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from framework import api
from framework.cli import main
from framework.engine.metrics import confusion, scores
from tests.conftest import REPO, load_script

pytestmark = pytest.mark.slow  # trains two tiny runs

CONTEST = {"mask": ["wear", "incorrect", "not_wear"], "gender": ["male", "female"], "age": ["<30", "30-59", "60+"]}
TARGETS = {"mask": {"column": "mask_state", "classes": CONTEST["mask"]},
           "gender": {"column": "gender", "classes": CONTEST["gender"]}, "age": {"column": "age", "bins": [30, 60]}}


def _recipe(folder: Path, name: str, **target) -> Path:
    recipe = {"data": {"root": str(folder), "sources": [{"type": "mask_contest", "name": "train",
                                                         "path": "train/images"}], **target.get("data", {})},
              "validation": {"type": "holdout", "ratio": 0.25, "group_by": "person"},
              "transforms": {"image_size": 32, "train": [{"name": "HorizontalFlip"}]},
              "model": {"backbone": "test_resnet"}, "train": {"epochs": 2, "batch_size": 16, "num_workers": 0},
              "logging": {"sample_grid": 0, "progress": False}, "output": {"root": str(folder / "runs")}}
    recipe |= {k: v for k, v in target.items() if k != "data"}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def contest(tmp_path_factory):
    folder = load_script(REPO / "scripts" / "make_contest_fixture.py").build(tmp_path_factory.mktemp("c") / "contest",
                                                                              persons=24, eval_persons=3)
    composite = _recipe(folder, "composite", data={"target": {"composite": TARGETS}},
                        checkpoint={"monitor": "val/composite/macro_f1"})
    heads = _recipe(folder, "heads", tasks=TARGETS)
    for path in (composite, heads):
        api.validate(path)
    runs = {name: api.run(path, name=name, log=lambda *_: None) for name, path in (("comp", composite),
                                                                                    ("heads", heads))}
    return folder, runs


def _csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _by_hand(rows: list[dict], q: str) -> dict:
    """A question's scores from a predictions.csv's answer and truth columns."""
    have = [r for r in rows if r[f"{q}_true"]]
    truth = [CONTEST[q].index(r[f"{q}_true"]) for r in have]
    chosen = [CONTEST[q].index(r[q]) for r in have]
    return scores(confusion(truth, chosen, len(CONTEST[q])), CONTEST[q])


@pytest.mark.parametrize("data", [None, "eval/labels.csv"], ids=["own split", "labelled csv"])
def test_per_question_figures_are_those_of_the_predictions_file(contest, data):
    folder, runs = contest
    for run in runs.values():
        result = api.evaluate(run, None if data is None else folder / data)
        metrics, rows = result["metrics"], _csv(result["out"] / "predictions.csv")
        per = metrics.get("questions") or metrics["tasks"]  # a composite head's questions, or the three heads
        for q in CONTEST:
            assert per[q]["macro_f1"] == pytest.approx(_by_hand(rows, q)["macro_f1"])
            assert per[q]["accuracy"] == pytest.approx(_by_hand(rows, q)["accuracy"])
        composite = metrics if "questions" in metrics else metrics["composite"]  # the 18 classes
        chosen = [sum(CONTEST[q].index(r[q]) * k for q, k in zip(CONTEST, (6, 3, 1))) for r in rows]
        truth = [sum(CONTEST[q].index(r[f"{q}_true"]) * k for q, k in zip(CONTEST, (6, 3, 1))) for r in rows]
        assert chosen == [int(r["composite_index"]) for r in rows]
        names = [f"{m}/{g}/{a}" for m in CONTEST["mask"] for g in CONTEST["gender"] for a in CONTEST["age"]]
        assert composite["macro_f1"] == pytest.approx(scores(confusion(truth, chosen, 18), names)["macro_f1"])


def test_the_composite_run_reports_each_question(contest):
    _, runs = contest
    record = [json.loads(ln) for ln in (runs["comp"] / "metrics.jsonl").read_text().splitlines()][-1]
    assert set(record["val"]["questions"]) == set(CONTEST)
    summary = api.run_summary(runs["comp"])
    assert summary["best_metric"] == "val/composite/macro_f1"
    assert summary["best_value"] == pytest.approx(record["val"]["macro_f1"])


def test_the_submission_file(contest, tmp_path):
    folder, runs = contest
    info = _csv(folder / "eval" / "info.csv")
    for name, run in runs.items():
        out = tmp_path / f"{name}.csv"
        result = CliRunner().invoke(main, ["predict", str(run), "--csv", str(folder / "eval" / "info.csv"),
                                           "--image-column", "ImageID", "--root", str(folder / "eval" / "images"),
                                           "--answer", "ans", "--out", str(out)])
        assert result.exit_code == 0, result.output
        submission = _csv(out)
        assert [r["ImageID"] for r in submission] == [r["ImageID"] for r in info]  # rows and order kept
        assert list(submission[0]) == ["ImageID", "ans"]
        predicted = {Path(r["path"]).name: r for r in _csv(tmp_path / f"{name}.predictions.csv")}
        for r in submission:
            p = predicted[r["ImageID"]]
            assert int(r["ans"]) == (CONTEST["mask"].index(p["mask"]) * 6 + CONTEST["gender"].index(p["gender"]) * 3
                                     + CONTEST["age"].index(p["age"]))
        mapping = _csv(tmp_path / f"{name}.classes.csv")
        assert len(mapping) == 18 and mapping[7] == {"index": "7", "mask": "incorrect", "gender": "male",
                                                     "age": "30-59"}


def test_a_run_that_is_not_the_contest_is_refused_a_submission(contest, tmp_path):
    folder, runs = contest
    run = api.run(_recipe(folder, "mask_only", data={"target": TARGETS["mask"]}), [f"output.root={tmp_path}"],
                  name="mask_only", log=lambda *_: None)
    result = CliRunner().invoke(main, ["predict", str(run), "--csv", str(folder / "eval" / "info.csv"), "--image-column",
                                       "ImageID", "--root", str(folder / "eval" / "images"), "--answer", "ans",
                                       "--out", str(tmp_path / "s.csv")])
    assert result.exit_code == 2 and "not the contest's 18 classes" in result.output, result.output
    assert not (tmp_path / "s.csv").exists()


def test_an_ensemble_of_the_heads_and_the_composite(contest, tmp_path):
    folder, runs = contest
    from framework.inference.ensemble import Voting

    result = api.ensemble([runs["heads"], runs["comp"]], folder / "eval" / "images", out=tmp_path / "e.csv",
                          voting=Voting(method="hard"))
    assert result["composite"] == list(CONTEST)
    member = result["validation"]["comp"]
    own = api.evaluate(runs["comp"])["metrics"]  # the member line is the run's own answer (its joint choice)
    assert member["composite"] == pytest.approx(own["macro_f1"])
    assert member["gender"] == pytest.approx(own["questions"]["gender"]["macro_f1"])


def test_the_sheet_ranks_both_forms_by_the_composite(contest):
    folder, runs = contest
    from framework.review.compare import CONTEST_COLUMN, find_runs, sheet

    cols, rows = sheet(find_runs([folder / "runs"]))
    both = {r["run"]: r for r in rows}
    assert both["comp"]["form"] == "composite: mask x gender x age" and both["heads"]["form"] == "3 heads"
    assert all(both[n][CONTEST_COLUMN] is not None for n in ("comp", "heads"))
    values = [r[CONTEST_COLUMN] for r in rows if r[CONTEST_COLUMN] is not None]
    assert values == sorted(values, reverse=True) and cols.index(CONTEST_COLUMN) < cols.index("val/macro_f1")


def test_pooled_folds_of_a_composite_head_answer_in_the_contest_column(contest, tmp_path):
    """--all-folds of the composite recipe: the pooled out-of-fold record has each question, and its sheet row the
    contest's column."""
    folder, _ = contest
    from framework.review.compare import CONTEST_COLUMN, find_crossvals, sheet

    path = folder / "composite.yaml"
    runs = api.run_all_folds(path, ["validation={type: kfold, k: 2, group_by: person}", f"output.root={tmp_path}"],
                             name="cv", log=lambda *_: None)
    pooled = json.loads((tmp_path / "cv-cv.json").read_text())["val"]
    assert set(pooled["questions"]) == set(CONTEST)
    from framework.folders import RunFolder

    kept = [RunFolder(r).kept_record(api.run_summary(r)["best_epoch"])["val"] for r in runs]
    by_hand = sum(k["questions"]["gender"]["confusion"][0][0] for k in kept)  # each fold's kept epoch, summed
    assert pooled["questions"]["gender"]["confusion"][0][0] == by_hand
    _, rows = sheet([], crossvals=find_crossvals([tmp_path]))
    assert rows[0][CONTEST_COLUMN] == pytest.approx(pooled["macro_f1"])
