"""`recipe export`: one model file per run (ONNX, TorchScript) that predicts what the run folder predicts, checks
itself against the run, runs without torch, and comes with a model card."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from framework import api
from framework.cli import main
from framework.errors import RunError
from tests.conftest import DATA, read_manifest, tiny_recipe

FAST = {"epochs": 2, "batch_size": 8, "num_workers": 0}
QUIET = {"log": lambda *_: None}


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _photos(tmp_path, dataset="maskedfacenet_maskon", n=10):
    folder = tmp_path / "photos"
    folder.mkdir(exist_ok=True)
    for r in read_manifest(dataset)[-n:]:  # images the tiny recipes never train on
        (folder / r["path"].split("/")[-1]).write_bytes((DATA / dataset / r["path"]).read_bytes())
    return folder


def _same_predictions(run, export, photos, tmp_path, **kw):
    """Predict from the run folder and from the export: the same label in every column of every row."""
    a = api.predict(run, photos, out=tmp_path / "from_run.csv", proba=True, **kw)
    b = api.predict(export, photos, out=tmp_path / "from_export.csv", proba=True, **kw)
    ra, rb = _rows(a["out"]), _rows(b["out"])
    assert len(ra) == len(rb) == 10 and list(ra[0]) == list(rb[0])
    for x, y in zip(ra, rb):
        for col in x:
            if ":" in col or col.endswith("_value"):  # probabilities and numbers: within the check's tolerance
                assert float(x[col]) == pytest.approx(float(y[col]), abs=1e-4), col
            else:
                assert x[col] == y[col], col
    return ra


@pytest.fixture
def cnn_run(finished_run):
    return finished_run.parent.parent, finished_run  # the session's tiny run (conftest), and its folder


@pytest.mark.slow
def test_a_cnn_export_predicts_what_the_run_predicts_and_its_card_lists_every_class(cnn_run, tmp_path):
    tmp, run = cnn_run
    result = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "exp")])
    assert result.exit_code == 0, result.output
    assert "max abs difference" in result.output and "warning" not in result.output
    info = json.loads((tmp_path / "exp" / "export.json").read_text())
    assert info["input"] == {"name": "images", "dtype": "uint8", "layout": "NCHW", "channels": "RGB",
                             "size": [32, 32], "batch": "dynamic", "normalised": "inside the model"}
    assert info["outputs"] == ["label.logits", "label.probs"] and info["finished"] is True and not info["composite"]
    assert info["check"]["max_abs_difference"] <= 1e-4 and info["check"]["images"] == 9
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == [
        "MODEL_CARD.md", "export.json", "labels.json", "model.onnx", "recipe.resolved.yaml"]  # one model file
    _same_predictions(run, tmp_path / "exp", _photos(tmp_path), tmp_path)
    card = (tmp_path / "exp" / "MODEL_CARD.md").read_text()
    kept = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    best = json.loads((run / "summary.json").read_text())["best_epoch"]
    per_class = next(r for r in kept if r["epoch"] == best)["val"]["per_class"]
    for c, m in per_class.items():  # every class, with the F1 of the kept epoch
        assert f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |" in card
    assert "no group (person or duplicate set) has images on both sides" in card
    assert "CC BY-NC-SA 4.0" in card  # the licence the maskon source's README declares
    again = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "exp")])
    assert again.exit_code == 2 and "exists already" in again.output


@pytest.mark.slow
def test_predicting_from_an_onnx_export_never_imports_torch(cnn_run, tmp_path):
    tmp, run = cnn_run
    api.export(run, out=tmp_path / "exp", **QUIET)
    photos = _photos(tmp_path)
    code = ("import sys\nfrom framework import api\n"
            f"api.predict({str(tmp_path / 'exp')!r}, {str(photos)!r}, out={str(tmp_path / 'p.csv')!r})\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
    assert len(_rows(tmp_path / "p.csv")) == 10


@pytest.mark.slow
def test_an_export_that_does_not_match_the_run_fails_with_the_difference_and_leaves_nothing(cnn_run, tmp_path,
                                                                                             monkeypatch):
    from framework.inference import export

    tmp, run = cnn_run
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # any difference, even 0, is now too large
    result = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "exp")])
    assert result.exit_code == 2 and "differs from the run's by up to" in result.output, result.output
    assert not (tmp_path / "exp").exists() and not list(tmp_path.glob(".exp*"))


@pytest.mark.slow
def test_a_torchscript_export_with_mirror_tta_inside_predicts_the_same(cnn_run, tmp_path):
    tmp, run = cnn_run
    info = api.export(run, "torchscript", tmp_path / "ts", tta="hflip", **QUIET)
    assert info["file"] == "model.pt" and info["tta"] == "hflip"
    _same_predictions(run, tmp_path / "ts", _photos(tmp_path), tmp_path, tta="hflip")
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "ts"), "--images", str(tmp_path / "photos"),
                                       "--tta", "none", "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "exported with test-time augmentation 'hflip' inside" in result.output
    (tmp_path / "ts" / "model.pt").write_bytes(b"not a model")
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "ts"), "--images", str(tmp_path / "photos"),
                                       "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "cannot be loaded as TorchScript" in result.output, result.output


def _utk_manifest(path, n=16):
    rows, taken = [], {}
    for r in read_manifest("utkface_subset"):
        if r["label"] and taken.get(r["label"], 0) < n // 2:
            taken[r["label"]] = taken.get(r["label"], 0) + 1
            rows.append([DATA / "utkface_subset" / r["path"], r["gender"], r["age"], r["group"]])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerows([["path", "gender", "age", "group"]] + rows)


@pytest.mark.slow
def test_a_multi_task_export_has_an_output_per_task_and_predicts_the_same(tmp_path):
    _utk_manifest(tmp_path / "utk.csv")
    path = tiny_recipe(tmp_path, data={"sources": [{"type": "csv", "allow_outside_root": True, "name": "utk",
                                                    "manifest": "utk.csv", "group_column": "group"}],
                                       "target": None},
                       tasks={"gender": {"column": "gender", "classes": ["male", "female"]},
                              "age": {"column": "age", "bins": [30, 60], "kind": "regression"},
                              "band": {"column": "age", "bins": [30, 60], "kind": "ordinal"}},
                       train=FAST)
    run = api.run(path, name="mt", **QUIET)
    info = api.export(run, out=tmp_path / "exp", **QUIET)
    assert info["outputs"] == ["gender.logits", "gender.probs", "age.logits", "age.probs", "age.value",
                               "band.logits", "band.probs"]
    assert info["composite"] == {"questions": ["gender", "age", "band"], "formula": "gender*9 + age*3 + band"}
    rows = _same_predictions(run, tmp_path / "exp", _photos(tmp_path, "utkface_subset"), tmp_path)
    assert {"composite", "composite_index", "age_value"} <= set(rows[0])
    card = (tmp_path / "exp" / "MODEL_CARD.md").read_text()
    assert all(f"Task `{t}`" in card for t in ("gender", "age", "band")) and "MAE" in card


@pytest.mark.slow
def test_a_vit_run_exports(tmp_path):
    path = tiny_recipe(tmp_path, model={"backbone": "test_vit3"}, transforms={"image_size": 48}, train=FAST)
    run = api.run(path, name="vit", **QUIET)
    info = api.export(run, out=tmp_path / "exp", **QUIET)
    assert info["check"]["max_abs_difference"] <= 1e-4 and info["input"]["size"] == [48, 48]
    _same_predictions(run, tmp_path / "exp", _photos(tmp_path), tmp_path)


@pytest.mark.slow
def test_an_unfinished_run_exports_its_best_checkpoint_and_says_so(tmp_path):
    def stop_after_first_epoch(line):
        if str(line).startswith("epoch 2/"):
            raise KeyboardInterrupt  # the user's Ctrl-C as the run's own log sees it

    path = tiny_recipe(tmp_path, train={**FAST, "epochs": 3})
    with pytest.raises(RunError, match="interrupted"):
        api.run(path, name="half", log=stop_after_first_epoch)
    run = tmp_path / "runs" / "half"
    result = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "exp")])
    assert result.exit_code == 0, result.output
    assert "warning: half is not finished" in result.output and "of 3 epochs" in result.output
    info = json.loads((tmp_path / "exp" / "export.json").read_text())
    assert info["finished"] is False
    assert "**Unfinished run.**" in (tmp_path / "exp" / "MODEL_CARD.md").read_text()


def test_commands_that_need_a_run_folder_say_so_for_an_export(tmp_path):
    (tmp_path / "export.json").write_text("{}")
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path)])
    assert result.exit_code == 2 and "is an exported model" in result.output
    broken = CliRunner().invoke(main, ["predict", str(tmp_path), "--images", str(tmp_path)])
    assert broken.exit_code == 2 and "the export description" in broken.output and "export.json" in broken.output


@pytest.mark.slow
def test_a_composite_k_fold_run_exports_its_questions_and_its_card_has_the_out_of_fold_figures(tmp_path):
    _utk_manifest(tmp_path / "utk.csv", n=24)
    path = tiny_recipe(tmp_path, data={"sources": [{"type": "csv", "allow_outside_root": True, "name": "utk",
                                                    "manifest": "utk.csv", "group_column": "group"}],
                                       "target": {"composite": {"gender": {"column": "gender",
                                                                           "classes": ["male", "female"]},
                                                                "age": {"column": "age", "bins": [30, 60]}}}},
                       validation={"type": "kfold", "k": 2, "fold": 0, "group_by": "group"}, train=FAST)
    api.run_all_folds(path, name="cv", log=lambda *_: None)
    run = tmp_path / "runs" / "cv-fold0"
    info = api.export(run, out=tmp_path / "exp", **QUIET)
    assert info["outputs"] == ["label.logits", "label.probs", "gender.probs", "age.probs"]
    assert info["composite"] == {"questions": ["gender", "age"], "formula": "gender*3 + age"}
    rows = _same_predictions(run, tmp_path / "exp", _photos(tmp_path, "utkface_subset"), tmp_path)
    assert {"gender", "age", "composite", "composite_index"} <= set(rows[0])
    from framework.inference.exported import load_export

    exported = load_export(tmp_path / "exp")  # the question outputs are the joint's marginals
    batch = np.zeros((3, 3, 32, 32), dtype=np.uint8)
    named = dict(zip(exported.outputs, exported.model(batch)))
    assert np.allclose(named["label.probs"].reshape(3, 2, 3).sum(2), named["gender.probs"], atol=1e-6)
    card = (tmp_path / "exp" / "MODEL_CARD.md").read_text()
    pooled = json.loads((tmp_path / "runs" / "cv-cv.json").read_text())["val"]["per_class"]
    assert "## Out-of-fold metrics (2 folds pooled" in card
    for c, m in pooled.items():
        assert f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |" in card


@pytest.mark.slow
def test_a_damaged_or_edited_export_is_refused_with_a_located_error(cnn_run, tmp_path):
    tmp, run = cnn_run
    api.export(run, out=tmp_path / "exp", **QUIET)
    photos = _photos(tmp_path)
    info_file = tmp_path / "exp" / "export.json"
    info = json.loads(info_file.read_text())

    def predict():
        return CliRunner().invoke(main, ["predict", str(tmp_path / "exp"), "--images", str(photos),
                                         "--out", str(tmp_path / "p.csv")])
    info_file.write_text(json.dumps(info | {"input": info["input"] | {"size": [64, 64]}}))
    result = predict()
    assert result.exit_code == 2 and "the model takes images of [32, 32], export.json says [64, 64]" in result.output
    info_file.write_text(json.dumps(info | {"outputs": ["x.probs"]}))
    assert predict().exit_code == 2
    info_file.write_text(json.dumps(info))
    (tmp_path / "exp" / "model.onnx").write_bytes(b"not a model")
    result = predict()
    assert result.exit_code == 2 and "cannot be loaded by onnxruntime" in result.output, result.output
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.slow
def test_an_export_whose_validation_images_moved_is_checked_on_random_images_and_says_so(cnn_run, tmp_path):
    import shutil

    tmp, run = cnn_run
    moved = shutil.copytree(run, tmp_path / "moved")
    rows = _rows(moved / "split.csv")
    with open(moved / "split.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([r | {"path": f"{tmp}/gone/" + r["path"].split("/")[-1]} for r in rows])  # moved away
    result = CliRunner().invoke(main, ["export", str(moved)])
    assert result.exit_code == 0, result.output
    assert "check: 8 random images (no validation image could be read)" in result.output
    info = json.loads((moved / "export-onnx" / "export.json").read_text())
    assert info["check"]["images"] == 0 and info["check"]["max_abs_difference"] <= 1e-4
