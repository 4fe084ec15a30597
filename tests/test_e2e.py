"""End to end on the CPU: a tiny recipe on real images trains in seconds; the run folder is complete."""
import json
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner

from framework import api
from framework.cli import main
from framework.errors import RecipeError
from tests.conftest import tiny_recipe


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def trained(finished_run):
    return finished_run  # the session's tiny run (conftest): 2 epochs, a checkpoint every epoch


def test_run_folder_has_everything(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"recipe.resolved.yaml", "split.csv", "metrics.jsonl", "summary.json", "labels.json", "checkpoints",
            "tb"} <= names
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_done"] == 2
    assert summary["best_metric"] == "val/macro_f1" and summary["best_epoch"] in (1, 2)
    assert set(summary["versions"]) >= {"torch", "timm", "albumentations"} and summary["wall_seconds"] > 0
    records = _metrics(trained)
    assert [r["epoch"] for r in records] == [1, 2]
    val = records[-1]["val"]
    assert set(val["per_class"]) == {"wear", "incorrect", "not_wear"}
    assert sum(m["support"] for m in val["per_class"].values()) == summary["num_val"]
    assert sum(map(sum, val["confusion"])) == summary["num_val"]  # every validation image counted once
    assert max(r["val"]["macro_f1"] for r in records) == pytest.approx(summary["best_value"])


def test_resolved_recipe_reruns_as_is(trained):
    loaded = api.load_recipe(trained / "recipe.resolved.yaml")
    assert loaded.recipe.transforms.image_size == 32
    assert loaded.recipe.model.backbone == "test_resnet"


def test_checkpoints_load_into_a_fresh_model(trained):
    from framework.models import build_model

    loaded = api.load_recipe(trained / "recipe.resolved.yaml")
    ckpts = {p.name for p in (trained / "checkpoints").iterdir()}
    assert {"last.pt", "best.pt", "epoch_0001.pt", "epoch_0002.pt"} <= ckpts
    state = torch.load(trained / "checkpoints" / "best.pt", weights_only=True)
    model, _ = build_model(loaded.recipe.model, {"label": 3}, (0.5,) * 3, (0.5,) * 3)
    model.load_state_dict(state["model"])
    assert state["classes"] == {"label": ["wear", "incorrect", "not_wear"]}
    out = model.eval()(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert out["label"].shape == (2, 3)


def test_tensorboard_events_hold_scalars_images_and_recipe(trained):
    acc = _events(trained / "tb")
    tags = acc.Tags()
    for scalar in ("train/loss", "train/accuracy", "train/macro_f1", "val/loss", "val/accuracy", "val/macro_f1",
                   "lr", "train/images_per_sec"):
        assert scalar in tags["scalars"], scalar
        assert [e.step for e in acc.Scalars(scalar)] == [1, 2]
    assert {"val/confusion_matrix", "train/augmented_samples"} <= set(tags["images"])
    image = acc.Images("val/confusion_matrix")[-1]
    assert image.width > 50 and image.height > 50
    assert any("recipe" in t for t in tags["tensors"])  # add_text is stored as a tensor summary
    f1 = [e.value for e in acc.Scalars("val/macro_f1")]
    assert f1 == pytest.approx([r["val"]["macro_f1"] for r in _metrics(trained)])
    # every training step's loss and learning rate, and every class's validation F1, precision and recall
    steps = acc.Scalars("train_step/loss")
    assert [e.step for e in steps] == list(range(len(steps))) and len(steps) >= 2 * 3
    assert [e.step for e in acc.Scalars("train_step/lr")] == [e.step for e in steps]
    last = _metrics(trained)[-1]["val"]["per_class"]
    for c in ("wear", "incorrect", "not_wear"):
        for m in ("f1", "precision", "recall"):
            assert acc.Scalars(f"val/{m}/{c}")[-1].value == pytest.approx(last[c][m])


def test_resume_continues_exactly(trained, tmp_path):
    """1 epoch + resume to 2 gives the same metrics as 2 epochs in one go."""
    resumed = tmp_path / "resumed"
    shutil.copytree(trained, resumed)
    shutil.copy(resumed / "checkpoints" / "epoch_0001.pt", resumed / "checkpoints" / "last.pt")
    api.run(resume=resumed, log=lambda *_: None)
    straight, again = _metrics(trained), _metrics(resumed)
    assert [r["epoch"] for r in again] == [1, 2]  # the old epoch-2 line was replaced, not duplicated
    for key in ("train", "val"):
        for metric in ("loss", "accuracy", "macro_f1"):
            assert again[-1][key][metric] == pytest.approx(straight[-1][key][metric], abs=1e-6), (key, metric)
    a = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert len(_events(resumed / "tb").Scalars("val/macro_f1")) == 2


def test_resume_refuses_a_changed_experiment(trained):
    with pytest.raises(RecipeError) as e:
        api.run(resume=trained, overrides=["train.optimizer.lr=0.1"], log=lambda *_: None)
    assert "only train.epochs" in str(e.value)
    with pytest.raises(RecipeError) as e:
        api.run(resume=trained, log=lambda *_: None)
    assert "already finished" in str(e.value)


def test_existing_run_folder_is_never_overwritten(trained):
    before = (trained / "summary.json").read_text()
    result = CliRunner().invoke(main, ["run", str(trained.parent.parent / "tiny.yaml"), "--name", "tiny"])
    assert result.exit_code == 2
    assert "already exists" in result.output and "--resume" in result.output
    assert (trained / "summary.json").read_text() == before


@pytest.mark.slow
def test_crash_mid_run_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    from framework.engine import runner

    real = runner.train_epoch

    def crash_in_epoch_2(s, epoch, *a):
        if epoch == 2:
            raise RuntimeError("simulated crash")
        return real(s, epoch, *a)

    monkeypatch.setattr(runner, "train_epoch", crash_in_epoch_2)
    path = tiny_recipe(tmp_path)
    with pytest.raises(RuntimeError):
        api.run(path, name="crash", log=lambda *_: None)
    run_dir = tmp_path / "runs" / "crash"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "simulated crash" in summary["error"]
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    monkeypatch.setattr(runner, "train_epoch", real)
    api.run(resume=run_dir, log=lambda *_: None)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


def test_unreadable_image_is_named_or_skipped(tmp_path):
    path = tiny_recipe(tmp_path)
    bad = tmp_path / "broken image.jpg"
    bad.write_bytes(b"")
    with open(tmp_path / "tiny.csv", "a") as f:
        f.write(f"{bad},wear,gbroken\n")
    result = CliRunner().invoke(main, ["run", str(path), "--name", "x"])
    assert result.exit_code == 2
    assert "broken image.jpg (empty file)" in result.output and "data.bad_images: skip" in result.output
    assert "Traceback" not in result.output
    run_dir = api.run(path, ["data.bad_images=skip", "train.epochs=1"], name="y", log=lambda *_: None)
    assert "broken image.jpg" in (run_dir / "skipped.csv").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["skipped_images"] == 1


def test_an_image_size_the_backbone_cannot_take_is_a_located_error(tmp_path):
    """test_vit3's 16 px patches cannot cut an 8 px image: the recipe's line and a fix, before any training."""
    path = tiny_recipe(tmp_path, model={"backbone": "test_vit3"}, transforms={"image_size": 8})
    result = CliRunner().invoke(main, ["run", str(path), "--name", "tiny8"])
    assert result.exit_code == 2, result.output
    assert "transforms.image_size" in result.output and "test_vit3 cannot take 8x8 images" in result.output
    assert "tiny.yaml:" in result.output and "default 160x160" in result.output
    assert "Traceback" not in result.output
    assert not list((tmp_path / "runs").glob("tiny8/checkpoints/*.pt"))


def test_empty_class_folder_and_label_only_in_validation(tmp_path, data_root):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "empty").mkdir()
    recipe = {"data": {"root": str(tmp_path), "sources": [{"type": "folder", "name": "f", "path": "imgs"}],
                       "target": {"column": "label"}}, "model": {"backbone": "test_resnet"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2 and "empty" in result.output and "data.sources[0].path" in result.output
    (tmp_path / "imgs" / "empty").rmdir()
    (tmp_path / "ext" / "c").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "ext" / "c" / "0.png")
    recipe["data"]["sources"].append({"type": "folder", "name": "external", "path": "ext"})
    recipe["validation"] = {"type": "source", "source": "external"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2 and "['c'] appear only in validation" in result.output


def test_hub_weights_fail_fast_with_a_fix(tmp_path):
    path = tiny_recipe(tmp_path, model={"backbone": "resnet18", "pretrained": True})
    result = CliRunner().invoke(main, ["run", str(path), "--name", "hub"])
    assert result.exit_code == 2, result.output
    assert "model.pretrained" in result.output and "model.weights" in result.output


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_load_and_a_mismatched_head_is_reinitialised(tmp_path, suffix):
    import timm

    net = timm.create_model("test_resnet", num_classes=7)
    weights = tmp_path / f"face_task{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(net.state_dict(), str(weights))
    else:
        torch.save(net.state_dict(), weights)
    path = tiny_recipe(tmp_path, model={"backbone": "test_resnet", "weights": str(weights)},
                       train={"epochs": 1, "batch_size": 8, "num_workers": 0})
    lines = []
    run_dir = api.run(path, name="w", log=lines.append)
    text = "\n".join(map(str, lines))
    assert "loaded" in text and "re-initialised" in text and "fc.weight" in text
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


def test_unusable_weights_files_are_named_with_the_fix(tmp_path):
    import timm

    from framework.errors import FieldError
    from framework.models import read_state_dict

    torch.save(timm.create_model("test_resnet"), tmp_path / "whole_model.pt")  # a model, not its state_dict
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "whole_model.pt").read_bytes()[:500])
    (tmp_path / "notes.pt").write_text("not weights")
    import pickle
    (tmp_path / "plain.pt").write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    expected = {"whole_model.pt": ("pickled Python objects (timm.models.resnet.ResNet)", "model.state_dict()"),
                "truncated.pt": ("a PyTorch file that is truncated or damaged", "copy it again"),
                "notes.pt": ("not a PyTorch file (nor safetensors)", "give a .safetensors file"),
                "plain.pt": ("a plain Python pickle, not a PyTorch file", "torch.save(state_dict"),
                "missing.pt": ("weights file not found", "checkpoints/best.pt")}
    for name, (message_part, fix_part) in expected.items():
        with pytest.raises(FieldError) as e:
            read_state_dict(tmp_path / name)
        (where, message, fix), = e.value.items
        assert where == ("model", "weights") and name in message
        assert message_part in message and fix_part in fix, (message, fix)
    path = tiny_recipe(tmp_path, model={"backbone": "test_resnet", "weights": str(tmp_path / "truncated.pt")})
    result = CliRunner().invoke(main, ["run", str(path), "--name", "bad-weights"])
    assert result.exit_code == 2 and "model.weights" in result.output and "Traceback" not in result.output


def test_unknown_or_missing_tracker_is_a_clear_error(tmp_path):
    import importlib.util

    path = tiny_recipe(tmp_path, logging={"trackers": ["tensorboard", "wandbb"], "progress": False})
    result = CliRunner().invoke(main, ["run", str(path), "--name", "t1"])
    assert result.exit_code == 2 and "logging.trackers[1]" in result.output and "Did you mean 'wandb'" in result.output
    missing = next(n for n in ("aim", "swanlab", "dvclive", "clearml") if importlib.util.find_spec(n) is None)
    path = tiny_recipe(tmp_path, logging={"trackers": [missing], "progress": False})
    result = CliRunner().invoke(main, ["run", str(path), "--name", "t2"])
    assert result.exit_code == 2 and f"pip install {missing}" in result.output


@pytest.mark.slow
def test_compiled_model_trains_and_its_checkpoint_loads_uncompiled(tmp_path):
    """torch.compile with the aot_eager backend: traced and run through AOTAutograd, no C++ build (the inductor
    default, `compile: true`, takes minutes to build on a 2-core CPU; it shares everything else)."""
    from framework.models import build_model

    run_dir = api.run(tiny_recipe(tmp_path, model={"backbone": "test_resnet", "compile": "aot_eager"},
                                  train={"epochs": 1, "batch_size": 8, "num_workers": 0}), name="c", log=lambda *_: None)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert not any("_orig_mod" in k for k in state)
    model, _ = build_model(api.load_recipe(run_dir / "recipe.resolved.yaml").recipe.model.model_copy(
        update={"compile": False}), {"label": 3}, (0.5,) * 3, (0.5,) * 3)
    model.load_state_dict(state)


def test_channels_last_reaches_weights_and_inputs_in_training_and_prediction(tmp_path):
    import copy

    from framework.inference import run as R

    run_dir = api.run(tiny_recipe(tmp_path, model={"backbone": "test_resnet", "channels_last": True},
                                  train={"epochs": 1, "batch_size": 8, "num_workers": 0}), name="cl", log=lambda *_: None)
    model = R.load_run(run_dir).model
    stem = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert stem.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    stem.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)["label"]
        assert seen == [True]
        # the same weights in the default layout: the same logits, up to rounding
        plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        plain.memory_format = torch.contiguous_format
        assert torch.allclose(plain(images)["label"], out, atol=1e-5) and seen == [True, False]


@pytest.mark.slow
def test_train_only_source_trains_and_its_leaking_rows_are_left_out(tmp_path, data_root):
    """A second, train_only source: its images train, never validate; one that shares a group with a validation
    image of the first source is left out (not decoded, counted in the summary, `unused` in split.csv)."""
    import csv

    from framework.build import build_data
    from tests.conftest import tiny_manifest

    path = tiny_recipe(tmp_path, train={"epochs": 1, "batch_size": 8, "num_workers": 0})
    base = build_data(api.load_recipe(path).recipe)
    val_group = next(r["group"] for r, s in zip(base.rows, base.sides) if s == "val")
    tiny_manifest(tmp_path / "extra.csv", per_class=3, dataset="chandrikadeb7_mask2")
    with open(tmp_path / "extra.csv", newline="", encoding="utf-8") as f:
        extra = list(csv.DictReader(f))
    extra[0]["group"] = val_group  # a near-duplicate of a validation image
    with open(tmp_path / "extra.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(extra[0]))
        w.writeheader()
        w.writerows(extra)
    recipe = yaml.safe_load(path.read_text())
    recipe["data"]["sources"].append({"type": "csv", "allow_outside_root": True,
                                      "name": "extra", "manifest": "extra.csv",
                                      "group_column": "group", "train_only": True})
    path.write_text(yaml.safe_dump(recipe))
    run_dir = api.run(path, name="extra")
    summary = json.loads((run_dir / "summary.json").read_text())
    base_counts = base.counts()
    assert sum(summary["counts"]["val"]["label"].values()) == sum(base_counts["val"]["label"].values())
    assert summary["num_train"] == sum(base_counts["train"]["label"].values()) + len(extra) - 1
    assert summary["unused_rows"] == 1
    with open(run_dir / "split.csv", newline="", encoding="utf-8") as f:
        sides = {r["path"]: r["split"] for r in csv.DictReader(f)}
    assert sides[extra[0]["path"]] == "unused"
    assert {sides[r["path"]] for r in extra[1:]} == {"train"}


@pytest.mark.slow
def test_ema_weights_validate_predict_and_resume_exactly(tmp_path):
    """With train.ema the checkpoint's `model` is the average (what validation scored and predictions use) and
    `train_model` the raw weights; 1 epoch + resume gives the same averages as 2 epochs straight."""
    from framework.inference import run as R

    path = tiny_recipe(tmp_path, train={"epochs": 2, "batch_size": 8, "num_workers": 0, "ema": 0.9},
                       checkpoint={"every": 1})
    run = api.run(path, name="ema", log=lambda *_: None)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    raw, avg = state["train_model"], state["model"]
    assert any(not torch.allclose(raw[k].float(), avg[k].float()) for k in raw)
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert torch.equal(R.load_run(run).model.state_dict()["net.heads.label.weight"], best["net.heads.label.weight"])
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.copy(resumed / "checkpoints" / "epoch_0001.pt", resumed / "checkpoints" / "last.pt")
    api.run(resume=resumed, log=lambda *_: None)
    again = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "train_model"):
        assert all(torch.allclose(state[key][k].float(), again[key][k].float(), atol=1e-6) for k in state[key])
    assert _metrics(resumed)[-1]["val"]["loss"] == pytest.approx(_metrics(run)[-1]["val"]["loss"], abs=1e-6)


@pytest.mark.slow
def test_mixup_trains_differently_and_resumes_exactly(tmp_path):
    """train.mixup blends images and losses by draws of (seed, epoch, batch): other weights than without it, and
    1 epoch + resume gives the same weights as 2 epochs straight."""
    base = {"epochs": 2, "batch_size": 8, "num_workers": 0}
    (tmp_path / "p").mkdir()
    plain = api.run(tiny_recipe(tmp_path / "p", train=base), name="plain", log=lambda *_: None)
    path = tiny_recipe(tmp_path, train={**base, "mixup": 0.4}, checkpoint={"every": 1})
    run = api.run(path, name="mix", log=lambda *_: None)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    other = torch.load(plain / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert not torch.allclose(state["net.heads.label.weight"], other["net.heads.label.weight"])
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.copy(resumed / "checkpoints" / "epoch_0001.pt", resumed / "checkpoints" / "last.pt")
    api.run(resume=resumed, log=lambda *_: None)
    again = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(state[k].float(), again[k].float(), atol=1e-6) for k in state)
    assert 0 <= _metrics(run)[-1]["train"]["accuracy"] <= 1


def test_a_training_loss_that_is_not_finite_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A loss of nan in epoch 2 used to train on for every epoch and end "done"."""
    from framework.loss_modules import MultiTaskLoss

    real = MultiTaskLoss.forward
    calls = {"n": 0}

    def nan_from_step_5(self, logits, labels):
        calls["n"] += 1
        loss = real(self, logits, labels)
        return loss * float("nan") if calls["n"] >= 5 else loss

    monkeypatch.setattr(MultiTaskLoss, "forward", nan_from_step_5)
    path = tiny_recipe(tmp_path, train={"epochs": 3, "batch_size": 8, "num_workers": 0})  # 4 steps per epoch
    result = CliRunner().invoke(main, ["run", str(path), "--name", "nan"])
    assert result.exit_code == 2, result.output
    assert "the training loss is nan in epoch 2, step 1" in result.output and "clip_grad_norm" in result.output
    run_dir = tmp_path / "runs" / "nan"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert [r["epoch"] for r in _metrics(run_dir)] == [1]


@pytest.mark.slow
def test_train_threads_sets_and_reports_the_thread_count(tmp_path):
    import torch

    before = torch.get_num_threads()
    lines = []
    try:
        api.run(tiny_recipe(tmp_path, train={"epochs": 1, "batch_size": 8, "num_workers": 0, "threads": 1}),
                name="one-thread", log=lines.append)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert any(ln.startswith("threads: 1 per process (train.threads") for ln in lines), lines


@pytest.mark.slow
def test_progress_bars_show_in_a_terminal_and_not_in_logs(tmp_path):
    """tqdm bars for each epoch and validation when a person watches (a pseudo-terminal), none in a pipe (logs, CI)."""
    import os
    import subprocess
    import sys

    path = tiny_recipe(tmp_path, train={"epochs": 1, "batch_size": 8, "num_workers": 0}, logging={"progress": True})

    def run(name, terminal):
        cmd = [sys.executable, "-m", "framework.cli", "run", str(path), "--name", name]
        if not terminal:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=300).stderr
        master, slave = os.openpty()
        proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(timeout=300)
        os.close(master)
        return b"".join(chunks).decode("utf-8", "replace")

    shown = run("tty", True)
    assert "epoch 1:" in shown and ("batch/s" in shown or "s/batch" in shown), shown[-2000:]
    assert "validate:" in shown
    piped = run("pipe", False)
    assert "batch/s" not in piped and "s/batch" not in piped
