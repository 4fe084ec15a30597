"""The macro-F1 decision rule: per-class offsets fitted on validation predictions, stored in the run, used by
predict, evaluate and ensemble, and reported in separate steps (argmax, cross-fitted, fitted)."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from framework import api
from framework.cli import main
from framework.engine.metrics import macro_f1
from framework.inference import decision as D
from tests.conftest import tiny_recipe


def _under_called(n=600, seed=0):
    """Three classes, the middle one rare (5%) and its probabilities shrunk: argmax under-calls it."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.6, 0.05, 0.35])
    logits = rng.normal(0, 1, (n, 3)) + 2.5 * np.eye(3)[y]
    logits[:, 1] -= 2.0  # the model's bias against the rare class
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True), y


def test_offsets_raise_macro_f1_by_calling_the_rare_class_more_often():
    probs, y = _under_called()
    off = D.fit_offsets(probs, y)
    before, after = macro_f1(y, probs.argmax(1), 3), macro_f1(y, D.pick(probs, off), 3)
    assert after > before + 0.03, (before, after)
    assert off[1] == max(off) and abs(off.sum()) < 1e-9  # the rare class is pushed up; offsets centred
    assert (D.pick(probs, off) == 1).sum() > (probs.argmax(1) == 1).sum()


def test_no_change_when_the_argmax_is_already_best():
    y = np.array([0, 1, 2] * 20)
    probs = np.eye(3)[y] * 0.8 + 0.2 / 3
    assert np.all(D.fit_offsets(probs, y) == 0)


def test_cross_fitted_picks_of_a_part_use_only_the_other_parts():
    probs, y = _under_called(300)
    parts = D.stratified_parts(y, k=3)
    assert all(set(y[parts == k]) == set(y) for k in range(3))  # every class in every part
    got = D.cross_fitted(probs, y, parts)
    mine = parts == 2
    want = D.pick(probs[mine], D.fit_offsets(probs[~mine], y[~mine]))
    assert np.array_equal(got[mine], want)


def test_offsets_that_do_not_help_on_held_out_parts_are_not_used(tmp_path):
    """Labels that are noise: offsets fitted on them raise the in-sample score, but not the cross-fitted one, so
    the run keeps the argmax (zero offsets stored, which predict treats as no rule)."""
    from types import SimpleNamespace

    rng = np.random.default_rng(0)  # here: argmax 0.340, offsets fitted in-sample 0.366, cross-fitted 0.282
    probs = rng.dirichlet([1, 1, 1], size=90)
    y = rng.integers(0, 3, size=90)
    (tmp_path / "best.pt").write_bytes(b"weights")
    run = SimpleNamespace(run_dir=tmp_path, checkpoint=tmp_path / "best.pt",
                          questions=lambda: {"q": ["a", "b", "c"]})
    result = D.fit_and_store([run], "noise", [{"q": (probs, y)}])["questions"]["q"]
    assert result["macro_f1_fitted"] > result["macro_f1_argmax"] > result["macro_f1_cross_fitted"]
    assert result["kept"] == "argmax" and set(result["offsets"].values()) == {0.0}
    assert any(result["fitted_offsets"]) and D.offsets_of(run) == {}


def _proba_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def decided_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("decided")
    recipe = tiny_recipe(tmp, eval={"decision": "macro_f1"}, train={"epochs": 2, "batch_size": 8, "num_workers": 0})
    lines = []
    run_dir = api.run(recipe, name="d", log=lines.append)
    return run_dir, tmp, lines


@pytest.mark.slow
def test_a_run_fits_stores_and_reports_its_decision_rule(decided_run):
    run_dir, _, lines = decided_run
    data = json.loads((run_dir / "decision.json").read_text())
    assert data["fitted_on"].startswith("its validation split") and set(data["questions"]) == {"label"}
    q = data["questions"]["label"]
    assert set(q["offsets"]) == {"wear", "incorrect", "not_wear"}
    assert q["macro_f1_fitted"] >= q["macro_f1_argmax"]  # fitted in-sample: never worse than argmax
    said = "\n".join(lines)
    assert "argmax" in said and "offsets fitted on the other parts" in said and "(the estimate to trust)" in said


@pytest.mark.slow
def test_predict_and_evaluate_use_the_stored_offsets_and_say_so(decided_run, tmp_path):
    run_dir, tmp, _ = decided_run
    work = shutil.copytree(run_dir, tmp_path / "copy")  # a copied run folder keeps its rule
    data = json.loads((work / "decision.json").read_text())
    offsets = {"wear": 0.0, "incorrect": 3.0, "not_wear": -3.0}  # a rule that visibly changes the picks
    data["questions"]["label"]["offsets"] = offsets
    (work / "decision.json").write_text(json.dumps(data))
    out = CliRunner().invoke(main, ["predict", str(work), "--csv", str(tmp / "tiny.csv"), "--out",
                                    str(tmp_path / "p.csv"), "--proba"])
    assert out.exit_code == 0 and "decision rule: per-class offsets for label" in out.output, out.output
    classes = list(offsets)
    for r in _proba_rows(tmp_path / "p.csv"):
        p = np.array([[float(r[f"label:{c}"]) for c in classes]])
        assert r["label"] == classes[int(D.pick(p, list(offsets.values()))[0])]
    assert "not_wear" not in {r["label"] for r in _proba_rows(tmp_path / "p.csv")}  # -3: visibly in effect
    ev = CliRunner().invoke(main, ["evaluate", str(work), "--csv", str(tmp / "tiny.csv"), "--out", str(tmp_path / "e")])
    assert ev.exit_code == 0 and "macro-F1 here: argmax" in ev.output, ev.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    steps = metrics["decision"]["macro_f1"]["label"]
    assert steps["rule"] == pytest.approx(metrics["metrics"]["macro_f1"])


@pytest.mark.slow
def test_offsets_of_another_checkpoint_are_not_used(decided_run, tmp_path):
    from framework.inference.run import load_run

    run_dir, _, _ = decided_run
    work = shutil.copytree(run_dir, tmp_path / "copy")
    assert D.offsets_of(load_run(work))
    data = json.loads((work / "decision.json").read_text())
    data["checkpoint"] = "best.pt:0000000000000000"  # as if fitted for a checkpoint retrained since
    (work / "decision.json").write_text(json.dumps(data))
    assert D.offsets_of(load_run(work)) == {}


@pytest.mark.slow
def test_k_fold_offsets_are_fitted_on_the_pooled_out_of_fold_predictions_and_ensembles_use_them(tmp_path):
    recipe = tiny_recipe(tmp_path, validation={"type": "kfold", "k": 3, "group_by": "group", "seed": 0},
                         eval={"decision": "macro_f1"}, train={"epochs": 1, "batch_size": 8, "num_workers": 0})
    result = CliRunner().invoke(main, ["run", str(recipe), "--all-folds", "--name", "cv"])
    assert result.exit_code == 0, result.output
    folds = [tmp_path / "runs" / f"cv-fold{k}" for k in range(3)]
    stored = [json.loads((f / "decision.json").read_text()) for f in folds]
    assert all(s["fitted_on"].startswith("the pooled out-of-fold predictions of 3 folds (36 images)") for s in stored)
    assert len({json.dumps(s["questions"]) for s in stored}) == 1  # one rule for all folds
    cv = json.loads((tmp_path / "runs" / "cv-cv.json").read_text())
    assert "macro_f1_cross_fitted" in cv["decision"]["questions"]["label"]
    assert "offsets fitted on the other parts" in result.output
    for f in folds:  # a rule that is in use (on 36 images the fitted one may rightly be left unused)
        data = json.loads((f / "decision.json").read_text())
        data["questions"]["label"]["offsets"] = {"wear": 0.5, "incorrect": 0.0, "not_wear": -0.5}
        (f / "decision.json").write_text(json.dumps(data))
    ens = CliRunner().invoke(main, ["ensemble", *map(str, folds), "--csv", str(tmp_path / "tiny.csv"),
                                    "--out", str(tmp_path / "e.csv"), "--method", "soft"])
    assert ens.exit_code == 0 and "decision rule: the members' macro-F1 offsets decide label" in ens.output, ens.output
