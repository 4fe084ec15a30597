"""Review tools on runs the tests train on the real data: explain, inspect, compare and sweep."""
import csv
from pathlib import Path
import json
import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from framework import api
from framework.cli import main
from framework.review.compare import changed, flatten, sheet
from framework.sweep import expand, split_values
from tests.conftest import DATA, read_manifest, tiny_manifest, tiny_recipe

FAST = {"epochs": 1, "batch_size": 8, "num_workers": 0}


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit3"])
def test_explain_writes_heatmaps_of_the_image_size_for_cnn_and_vit(tmp_path, backbone):
    # test_vit3 is built for 160 px only: trained and explained at 48 px, it is built for that size
    path = tiny_recipe(tmp_path, model={"backbone": backbone}, transforms={"image_size": 32 if backbone ==
                                                                           "test_resnet" else 48}, train=FAST)
    run_dir = api.run(path, name=backbone, log=lambda *_: None)
    images = [DATA / "maskedfacenet_maskon" / r["path"] for r in read_manifest("maskedfacenet_maskon")[:2]]
    images.append(DATA / "quirks" / "files" / "with_mask175.jpg")  # 5760x3272, not square
    result = CliRunner().invoke(main, ["explain", str(run_dir), *map(str, images), "--out", str(tmp_path / "cam")])
    assert result.exit_code == 0, result.output
    for img in images:
        written = list((tmp_path / "cam").glob(f"{img.stem}_label_*.png"))
        assert len(written) == 1
        with Image.open(img) as original, Image.open(written[0]) as heat:
            assert heat.size == original.size
            pixels = np.asarray(heat.convert("RGB")).astype(int)
            assert pixels.std() > 5  # an overlay, not a blank image
    assert Image.open(tmp_path / "cam" / "contact_sheet.png").size[0] > 300


@pytest.mark.slow
def test_explain_needs_a_known_task_class_and_layer(tmp_path):
    run_dir = api.run(tiny_recipe(tmp_path, train=FAST), name="r", log=lambda *_: None)
    img = str(DATA / "maskedfacenet_maskon" / read_manifest("maskedfacenet_maskon")[0]["path"])
    for args, words in [(["--task", "age"], "no task 'age'"), (["--target", "maybe"], "not a class"),
                        (["--layer", "net.features.layr1"], "Did you mean")]:
        result = CliRunner().invoke(main, ["explain", str(run_dir), img, "--out", str(tmp_path / "x"), *args])
        assert result.exit_code == 2 and words in result.output, result.output
    result = CliRunner().invoke(main, ["explain", str(run_dir), img, "--target", "incorrect", "--out",
                                       str(tmp_path / "t")])
    assert result.exit_code == 0 and list((tmp_path / "t").glob("*_label_incorrect.png"))


def _metric_lines(run_dir):
    """metrics.jsonl without the timings (which differ between any two runs)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record["train"].pop("images_per_sec"), record["train"].pop("seconds")
        out.append(record)
    return out


@pytest.mark.slow
def test_cams_go_to_tensorboard_and_change_nothing_in_training_or_resume(tmp_path):
    """Grad-CAM logging is a hook wired from outside: with cam_every: 1 the run's metrics are exactly those of the
    same run without it, and a run resumed after epoch 2 matches the straight one and follows the same images."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train = {**FAST, "epochs": 3}
    cams = {"cam_every": 1, "cam_images": 3, "progress": False}
    (tmp_path / "plain").mkdir()
    plain = api.run(tiny_recipe(tmp_path / "plain", train=train), name="plain", log=lambda *_: None)
    path = tiny_recipe(tmp_path, train=train, logging=cams, checkpoint={"every": 1, "keep_last": 5})
    run_dir = api.run(path, name="cams", log=lambda *_: None)
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("val/gradcam")] == [1, 2, 3]
    assert _metric_lines(run_dir) == _metric_lines(plain)  # bit-identical, every epoch
    chosen = json.loads((run_dir / "cam_images.json").read_text())
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.copy(resumed / "checkpoints" / "epoch_0002.pt", resumed / "checkpoints" / "last.pt")
    api.run(resume=resumed, log=lambda *_: None)
    assert _metric_lines(resumed) == _metric_lines(run_dir)
    assert json.loads((resumed / "cam_images.json").read_text()) == chosen


@pytest.mark.slow
def test_inspect_finds_planted_leakage_and_the_odd_quirks_files(tmp_path):
    rows = read_manifest("quirks")
    with open(tmp_path / "q.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group"])
        for i, r in enumerate(rows):
            w.writerow([DATA / "quirks" / r["path"], ["with_mask", "other"][i % 2], "g-shared" if i < 2 else r["group"]])
    # a split file that puts the two members of group g-shared on different sides: planted leakage
    with open(tmp_path / "split.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "split"])
        for i, r in enumerate(rows):
            w.writerow([DATA / "quirks" / r["path"], "val" if i in (1, 5, 6) else "train"])
    recipe = {"data": {"root": str(tmp_path), "sources": [{"type": "csv", "allow_outside_root": True,
                                                           "name": "q", "manifest": "q.csv",
                                                            "group_column": "group"}], "target": {"column": "label"}},
              "validation": {"type": "file", "path": "split.csv"}, "model": {"backbone": "test_resnet"},
              "transforms": {"image_size": 48, "train": [{"name": "HorizontalFlip"}, {"name": "Affine", "rotate": 10}]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    # training refuses the leaky split; inspect reports it
    assert CliRunner().invoke(main, ["validate", str(tmp_path / "r.yaml")]).exit_code == 2
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "g-shared" in report["leakage"]["groups_on_both_sides"][0]
    odd = {f["path"].split("/")[-1]: f["odd"] for f in report["odd_files"]}
    assert "PNG data behind a .jpg extension" in odd["with_mask129.jpg"]
    assert "palette" in odd["with_mask014.png"] and "alpha channel" in odd["maksssksksss110.png"]
    assert any("very large" in o for o in odd["with_mask175.jpg"])
    assert any("tiny" in o for o in odd["712.png"]) and "non-ASCII name" in odd["0_0_œ¬‘ÿ.png"]
    assert "space in name" in odd["1_0_1 copy 13.jpg"]
    assert report["sizes"]["width"]["max"] == 5760 and report["unreadable"] == []
    preview = Image.open(tmp_path / "out" / "augmentations.png")
    assert preview.size[0] >= 7 * 96  # original, resized, 5 draws
    assert "counts" in report and sum(report["counts"]["label"]["q"]["train"].values()) == 7


def test_inspect_lists_images_that_fail_to_decode(tmp_path):
    path = tiny_recipe(tmp_path)
    (tmp_path / "zero.jpg").write_bytes(b"")
    with open(tmp_path / "tiny.csv", "a") as f:
        f.write(f"{tmp_path / 'zero.jpg'},wear,gz\n")
    result = CliRunner().invoke(main, ["inspect", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [p for p, _ in report["unreadable"]] == [str(tmp_path / "zero.jpg")]
    assert "unreadable images: 1" in result.output


def test_inspect_splits_like_the_run_does_with_a_train_only_source(tmp_path):
    """inspect's counts per source and side are the run's split: a train_only source never shows in validation."""
    from framework.review.inspect import inspect_recipe

    tiny_manifest(tmp_path / "extra.csv", per_class=10, dataset="chandrikadeb7_mask2")
    path = tiny_recipe(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["data"]["sources"].append({"type": "csv", "allow_outside_root": True, "name": "extra", "train_only": True,
                                    "manifest": "extra.csv", "group_column": "group"})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    report = inspect_recipe(path, decode_all=False)
    plan = api.validate(path).plan
    expected: dict = {}
    for r, side, k in zip(plan.rows, plan.sides, plan.ys["label"]):
        c = expected.setdefault(r["source"], {}).setdefault(side, {})
        c[plan.labels["label"].classes[k]] = c.get(plan.labels["label"].classes[k], 0) + 1
    assert report["counts"]["label"] == expected
    assert set(expected["extra"]) == {"train"} and "val" in expected["maskon"]


@pytest.mark.slow
def test_compare_what_changed_is_right_for_runs_that_differ_in_two_keys(tmp_path):
    path = tiny_recipe(tmp_path, train=FAST, notes="tiny")
    base = api.run(path, name="base", log=lambda *_: None)
    other = api.run(path, ["train.optimizer.lr=0.01", "transforms.image_size=40"], name="other",
                    log=lambda *_: None)
    cols, rows = sheet([base, other], baseline=base)
    by_name = {r["run"]: r for r in rows}
    assert by_name["base"]["changed"] == "baseline"
    assert by_name["other"]["changed"] == "train.optimizer.lr: 0.001 -> 0.01; transforms.image_size: 32 -> 40"
    assert by_name["other"]["image_size"] == "40x40" and by_name["other"]["status"] == "finished"
    # the notes say how each run was started: the recipe's own notes, then its command-line overrides
    assert by_name["base"]["notes"] == "tiny"
    assert by_name["other"]["notes"] == "tiny [--set train.optimizer.lr=0.01 transforms.image_size=40]"
    assert {"run", "date", "status", "backbone", "recipe", "epochs", "val/macro_f1", "wall_s", "notes",
            "changed"} <= set(cols)
    for fmt in ("table", "csv", "md", "html"):
        result = CliRunner().invoke(main, ["compare", str(tmp_path / "runs"), "--baseline", str(base),
                                           "--format", fmt])
        arrow = "-&gt;" if fmt == "html" else "->"
        assert result.exit_code == 0 and f"train.optimizer.lr: 0.001 {arrow} 0.01" in result.output
    html = CliRunner().invoke(main, ["compare", str(tmp_path / "runs"), "--format", "html"]).output
    assert html.startswith("<!doctype html>") and "sortBy(" in html and "<script" in html and "http" not in html
    # without --baseline each run is compared with its nearest earlier run, not with one far-away baseline
    third = api.run(path, ["train.optimizer.lr=0.01", "transforms.image_size=40", "train.seed=3"], name="third",
                    log=lambda *_: None)
    by_name = {r["run"]: r for r in sheet([base, other, third])[1]}
    assert by_name["base"]["changed"] == "baseline"
    assert by_name["third"]["changed"] == "vs other: train.seed: 0 -> 3"


def test_a_class_never_found_is_named_at_the_end_of_a_run(tmp_path):
    from framework.review.compare import kept_classes

    def val(found_incorrect):
        per = {"wear": {"f1": 0.97, "recall": 1.0, "support": 90},
               "incorrect": {"f1": 0.5 if found_incorrect else 0.0, "recall": 0.5 if found_incorrect else 0.0,
                             "support": 4},
               "not_wear": {"f1": 0.9, "recall": 0.9, "support": 6}}
        return {"accuracy": 0.95, "macro_f1": 0.62, "per_class": per}

    train = {"macro_f1": 0.9, "accuracy": 0.9}
    records = [{"epoch": 1, "train": train, "val": val(True)}, {"epoch": 2, "train": train, "val": val(False)}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert kept_classes(tmp_path, 1) == ["F1 per class at epoch 1 (validation images): wear 0.970 (90), "
                                         "incorrect 0.500 (4), not_wear 0.900 (6)"]
    line, warning = kept_classes(tmp_path, 2)
    assert line.startswith("F1 per class at epoch 2") and "incorrect 0.000 (4)" in line
    assert warning.startswith("warning: none of the validation images of incorrect (4) was found (F1 0), though "
                              "accuracy is 0.950") and "train.sampler: balanced" in warning
    # several heads: one line per task, named
    (tmp_path / "metrics.jsonl").write_text(json.dumps(
        {"epoch": 3, "train": train, "val": {"accuracy": 0.9, "macro_f1": 0.7, "tasks": {"mask": val(True), "age": val(False)}}}))
    lines = kept_classes(tmp_path, 3)
    assert [ln.split(" ")[0] for ln in lines] == ["mask:", "age:", "warning:"] and "age: none of" in lines[2]


def test_changed_and_flatten_by_hand():
    a = flatten({"train": {"lr": 1, "epochs": 3}, "model": {"backbone": "x"}, "output": {"root": "a"}})
    b = flatten({"train": {"lr": 2, "epochs": 3}, "model": {"backbone": "y"}, "output": {"root": "b"}, "new": [1]})
    assert changed(b, a) == ["model.backbone: x -> y", "new: - -> [1]", "train.lr: 1 -> 2"]


def test_sweep_grid_expands_and_names_runs_as_documented(tmp_path):
    plan = expand(["recipes/hard_aug.yaml"], ["model.backbone=resnet18,efficientnet_b0",
                                              "transforms.image_size=128,[96, 128]"])
    assert [m["name"] for m in plan] == [
        "hard_aug-backbone=resnet18-image_size=128", "hard_aug-backbone=resnet18-image_size=96_128",
        "hard_aug-backbone=efficientnet_b0-image_size=128", "hard_aug-backbone=efficientnet_b0-image_size=96_128"]
    assert plan[1]["overrides"] == ["model.backbone=resnet18", "transforms.image_size=[96, 128]"]
    assert split_values("a, [1, 2],{x: 1}") == ["a", "[1, 2]", "{x: 1}"]
    path = tiny_recipe(tmp_path, train=FAST)
    result = CliRunner().invoke(main, ["sweep", str(path), "--grid", "train.optimizer.lr=0.001,0.01",
                                       "--grid", "transforms.image_size=32,40", "--dry-run"])
    assert result.exit_code == 0 and result.output.count("tiny-lr=") == 4
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_sweep_runs_members_records_failures_and_prints_the_sheet(tmp_path):
    path = tiny_recipe(tmp_path, train=FAST)
    result = CliRunner().invoke(main, ["sweep", str(path), "--grid", "model.backbone=test_resnet,no_such_net",
                                       "--grid", "transforms.image_size=32,40"])
    assert result.exit_code == 1  # some members failed
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())  # no folder for the unknown backbone
    assert names == ["tiny-backbone=test_resnet-image_size=32", "tiny-backbone=test_resnet-image_size=40"]
    assert "failed: tiny-backbone=no_such_net-image_size=32" in result.output and "unknown backbone" in result.output
    assert "changed" in result.output and "transforms.image_size: 32 -> 40" in result.output  # the sheet
    # a grid value the recipe refuses stops the sweep before anything trains
    bad = CliRunner().invoke(main, ["sweep", str(path), "--grid", "train.epochs=1,0", "--name", "bad"])
    assert bad.exit_code == 2 and "train.epochs" in bad.output
    assert not [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("bad")]


@pytest.mark.slow
def test_sweep_goes_on_after_a_failed_member(tmp_path, monkeypatch):
    from framework import sweep

    path = tiny_recipe(tmp_path, train=FAST)
    real = api.run

    def flaky(recipe, overrides, name, log):
        if "image_size=40" in name:
            raise RuntimeError("simulated out of memory")
        return real(recipe, overrides, name=name, log=log)

    monkeypatch.setattr(api, "run", flaky)
    plan = sweep.expand([path], ["transforms.image_size=32,40,48"])
    results = sweep.run_sweep(plan, api.run_or_continue, log=lambda *_: None)
    assert [r["status"] for r in results] == ["finished", "failed", "finished"]
    assert "simulated out of memory" in results[1]["error"]


def test_a_stopped_sweep_stops_and_names_the_members_not_started(tmp_path, monkeypatch):
    from framework import sweep
    from framework.errors import Interrupted, Issue

    started, lines = [], []

    def stopped(recipe, overrides, name, log):
        started.append(name)
        raise Interrupted(Issue("stopped by SIGINT in epoch 1 after 2 batches; a resumable checkpoint is saved."))

    monkeypatch.setattr(api, "run", stopped)
    plan = sweep.expand([tiny_recipe(tmp_path, train=FAST)], ["transforms.image_size=32,40,48"])
    with pytest.raises(Interrupted):
        sweep.run_sweep(plan, api.run_or_continue, log=lines.append)
    assert started == [plan[0]["name"]]
    assert lines[-1] == f"sweep stopped; not started: {plan[1]['name']}, {plan[2]['name']}"


@pytest.mark.slow
def test_the_same_sweep_run_again_keeps_finished_members_and_resumes_the_interrupted_one(tmp_path, monkeypatch):
    from framework import sweep
    from framework.engine import runner
    from framework.errors import Interrupted, Issue

    real = runner.train_epoch

    def stop_40px_in_epoch_2(s, epoch, *a):
        if s.image_size == (40, 40) and epoch == 2:
            raise Interrupted(Issue("stopped by SIGTERM in epoch 2 after 0 batches."))
        return real(s, epoch, *a)

    monkeypatch.setattr(runner, "train_epoch", stop_40px_in_epoch_2)
    plan = sweep.expand([tiny_recipe(tmp_path, train={**FAST, "epochs": 2})], ["transforms.image_size=32,40"])
    with pytest.raises(Interrupted):
        sweep.run_sweep(plan, api.run_or_continue, log=lambda *_: None)
    done, stopped = (tmp_path / "runs" / m["name"] for m in plan)
    assert json.loads((stopped / "summary.json").read_text())["status"] == "interrupted"
    kept_at = (done / "checkpoints" / "best.pt").stat().st_mtime_ns

    monkeypatch.setattr(runner, "train_epoch", real)
    # a summary that still says "running": resumed only when its process is gone (killed before it could say so)
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["process"] == {"host": platform.node(), "pid": os.getpid()}
    (stopped / "summary.json").write_text(json.dumps({**summary, "status": "running"}))  # and this process lives
    alive = sweep.run_sweep(plan, api.run_or_continue, log=lambda *_: None)
    assert [r["status"] for r in alive] == ["finished", "failed"] and "still running" in alive[1]["error"]
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = {"host": platform.node(), "pid": int(ended.stdout)}
    (stopped / "summary.json").write_text(json.dumps({**summary, "status": "running", "process": gone}))
    lines = []
    results = sweep.run_sweep(plan, api.run_or_continue, log=lines.append)
    assert [r["status"] for r in results] == ["finished", "finished"]
    assert f"{plan[0]['name']}: finished earlier with the same recipe; kept ({done})" in lines
    assert f"{plan[1]['name']}: interrupted earlier; continuing from its last saved epoch" in lines
    assert (done / "checkpoints" / "best.pt").stat().st_mtime_ns == kept_at  # not trained again
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["resumed_at_epoch"] == 1

    # another recipe under the same names, or a member that failed: named, with the fix, and left as it is
    other = sweep.run_sweep(plan, api.run_or_continue, base_overrides=["train.optimizer.lr=0.01"], log=lambda *_: None)
    assert all(r["status"] == "failed" and "trained with another recipe" in r["error"] for r in other)
    summary.update(status="failed", error="simulated out of memory")
    (stopped / "summary.json").write_text(json.dumps(summary))
    again = sweep.run_sweep(plan, api.run_or_continue, log=lambda *_: None)
    assert again[0]["status"] == "finished" and again[1]["status"] == "failed"
    assert "it failed earlier (simulated out of memory)" in again[1]["error"] and f"remove {stopped}" in again[1]["error"]


def test_compare_shows_the_kept_checkpoints_epoch_with_every_class_f1(tmp_path):
    """The sheet's figures all come from the epoch of `best.pt`, not the best of each metric over epochs."""
    path = tiny_recipe(tmp_path, train={**FAST, "epochs": 3})
    run = api.run(path, name="three", log=lambda *_: None)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    best_epoch = json.loads((run / "summary.json").read_text())["best_epoch"]
    kept = next(r for r in records if r["epoch"] == best_epoch)["val"]
    cols, rows = sheet([run])
    row = rows[0]
    assert row["best_epoch"] == best_epoch
    assert row["val/loss"] == kept["loss"] and row["val/macro_f1"] == kept["macro_f1"]
    assert [c for c in cols if "/f1/" in c] == ["val/f1/wear", "val/f1/incorrect", "val/f1/not_wear"]
    assert row["val/f1/incorrect"] == kept["per_class"]["incorrect"]["f1"]


def test_changed_lists_sources_and_augmentations_by_position_and_whole_entries_once():
    a = flatten({"data": {"sources": [{"name": "a", "manifest": "a.csv"}]}, "transforms": {"train": [
        {"name": "HorizontalFlip"}, {"name": "Affine", "scale": [0.9, 1.1]}]}})
    b = flatten({"data": {"sources": [{"name": "a", "manifest": "a.csv"}, {"name": "b", "manifest": "b.csv"}]},
                 "transforms": {"train": [{"name": "HorizontalFlip"}, {"name": "Affine", "scale": [0.8, 1.2]}]}})
    assert changed(b, a) == ["data.sources.1: - -> b", "transforms.train.1.scale: [0.9, 1.1] -> [0.8, 1.2]"]
    assert changed(a, b) == ["data.sources.1: b -> -", "transforms.train.1.scale: [0.8, 1.2] -> [0.9, 1.1]"]


def test_the_inspect_heading_says_what_the_list_under_it_shows():
    """It said "no group on both sides" above a list of 89 byte-identical pairs on both sides."""
    from framework.review.inspect import format_report

    def report(groups, pairs):
        return {"recipe": "r.yaml", "images": 4, "dropped_without_label": 0, "counts": {}, "unreadable": [],
                "odd_files": [], "sizes": {},
                "leakage": {"groups_on_both_sides": groups, "identical_files_on_both_sides": pairs}}

    assert "leakage audit: clean" in format_report(report([], []))
    text = format_report(report([], [["a.jpg", "b.jpg"]]))
    assert "leakage audit: LEAK: no group id is on both sides, but 1 byte-identical file pair(s) are" in text
    assert "leakage audit: LEAK: group g1 (2 train, 1 val)" in format_report(report(["group g1 (2 train, 1 val)"], []))


@pytest.mark.slow
def test_explain_captions_carry_the_true_label_when_it_is_known(tmp_path):
    """Images of the run's own split, and CSVs with the run's label column: the caption says the true class too."""
    run_dir = api.run(tiny_recipe(tmp_path, train=FAST), name="t", log=lambda *_: None)
    manifest = tmp_path / "tiny.csv"
    result = api.explain(run_dir, [str(manifest)], out=tmp_path / "cam")
    rows = {str(Path(r["path"]).resolve()): r["mask_state"] for r in csv.DictReader(open(manifest, encoding="utf-8"))}
    assert result["items"] and all(it["true"] == rows[str(Path(it["path"]).resolve())] for it in result["items"])
    stranger = DATA / "quirks" / "files" / "with_mask175.jpg"  # in no split and no CSV: no true label
    other = api.explain(run_dir, [str(stranger)], out=tmp_path / "cam2")
    assert other["items"][0]["true"] is None
