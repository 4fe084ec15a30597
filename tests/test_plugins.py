"""Plugins: the face-keeping crop on real boxes, plugin discovery (files, entry points), clear failures."""
import csv
import json
import random
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from framework import api
from framework.cli import main
from framework.plugins import load_plugin
from framework.registry import LOSSES, TRANSFORMS
from tests.conftest import REPO, tiny_recipe

FACE_CROP = str(REPO / "plugins" / "face_crop.py")


@pytest.fixture(scope="module")
def face_crop():
    load_plugin(FACE_CROP)
    import sys
    return next(m for n, m in sys.modules.items() if n.startswith("recipe_plugin_face_crop_"))


def _boxes(data_root):
    """(width, height, box) for every real face box of the kaggle crops and the MaskON portraits."""
    out = []
    for name in ("face_mask_kaggle3/crops_manifest.csv", "maskedfacenet_maskon/manifest.csv"):
        with open(data_root / name, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                if r["xmin"] and r["xmax"]:
                    out.append((int(r["width"]), int(r["height"]),
                                tuple(float(r[k]) for k in ("xmin", "ymin", "xmax", "ymax"))))
    return out


def _pixels(box, w, h):
    """The box as the pipeline carries it: clipped to the image, grown to whole pixels."""
    import math
    x0, y0, x1, y1 = box
    x0, y0, x1, y1 = max(0.0, min(x0, w)), max(0.0, min(y0, h)), max(0.0, min(x1, w)), max(0.0, min(y1, h))
    return math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)


def test_face_box_is_always_inside_the_crop_on_real_boxes(face_crop, data_root):
    boxes = _boxes(data_root)
    touching = [b for b in boxes if b[2][0] <= 0 or b[2][1] <= 0 or b[2][2] >= b[0] or b[2][3] >= b[1]]
    assert len(boxes) > 3500 and len(touching) > 10  # real boxes, some at or past the border
    rng = random.Random(0)
    draws = 0
    for w, h, box in boxes:
        px = _pixels(box, w, h)
        if px[2] <= px[0] or px[3] <= px[1]:
            continue
        for scale in ((0.08, 1.0), (0.5, 1.0)):
            x0, y0, x1, y1 = face_crop.crop_around(px, w, h, scale, (0.75, 4 / 3), rng)
            assert 0 <= x0 <= px[0] and 0 <= y0 <= px[1] and px[2] <= x1 <= w and px[3] <= y1 <= h, (w, h, box)
            draws += 1
    assert draws > 7000


def test_face_crop_in_a_pipeline_on_real_images_keeps_the_whole_box(face_crop, data_root):
    from framework.data.dataset import resize_one
    from framework.recipe.schema import ResizeSpec
    from framework.transforms import albumentations, augmentation_stage, resize_stage

    A = albumentations()
    resize = resize_stage((64, 64), ResizeSpec(mode="pad"), with_boxes=True)
    crop = augmentation_stage([face_crop.FaceKeepingCrop(size=(48, 48), scale=(0.1, 1.0))], with_boxes=True)
    crop.save_applied_params = True
    assert isinstance(crop, A.Compose)
    rows = []
    with open(data_root / "face_mask_kaggle3" / "crops_manifest.csv", newline="", encoding="utf-8") as f:
        rows = [r for i, r in enumerate(csv.DictReader(f)) if i % 30 == 0]
    checked = 0
    for i, r in enumerate(rows):
        box = tuple(float(r[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
        image, rbox = resize_one(str(data_root / "face_mask_kaggle3" / r["path"]), box, resize)
        if rbox is None:
            continue
        crop.set_random_seed(i)
        out = crop(image=image, bboxes=np.array([rbox], dtype=np.float32), box_ids=[0])
        x0, y0, x1, y1 = out["applied_transforms"][0][1]["crop_coords"]
        px = _pixels(rbox, 64, 64)
        assert x0 <= px[0] and y0 <= px[1] and x1 >= px[2] and y1 >= px[3]
        ob = out["bboxes"][0]  # the face box after crop + resize, never clipped
        sx, sy = 48 / (x1 - x0), 48 / (y1 - y0)
        assert ob[2] - ob[0] == pytest.approx((rbox[2] - rbox[0]) * sx, abs=1e-3)
        assert ob[3] - ob[1] == pytest.approx((rbox[3] - rbox[1]) * sy, abs=1e-3)
        checked += 1
    assert checked > 80


@pytest.mark.slow
def test_recipe_with_plugin_files_trains_end_to_end(tmp_path, data_root):
    manifest = tmp_path / "boxes.csv"
    with open(data_root / "maskedfacenet_maskon" / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    taken = {}
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "mask_state", "group", "xmin", "ymin", "xmax", "ymax"])
        for r in rows:
            if taken.get(r["mask_state"], 0) < 10 or r["has_annotation"] == "0":  # and the 12 without a box
                taken[r["mask_state"]] = taken.get(r["mask_state"], 0) + 1
                w.writerow([data_root / "maskedfacenet_maskon" / r["path"], r["mask_state"], r["group"],
                            r["xmin"], r["ymin"], r["xmax"], r["ymax"]])
    path = tiny_recipe(
        tmp_path,
        plugins=[FACE_CROP, str(REPO / "plugins" / "gem_backbone.py")],
        data={"sources": [{"type": "csv", "allow_outside_root": True,
                           "name": "maskon", "manifest": "boxes.csv", "group_column": "group",
                           "box_columns": ["xmin", "ymin", "xmax", "ymax"]}]},
        transforms={"image_size": 48, "train": [{"name": "FaceKeepingCrop", "size": [48, 48], "scale": [0.3, 1.0]},
                                                {"name": "HorizontalFlip"}]},
        model={"backbone": "gem_test_resnet"},
        train={"epochs": 1, "batch_size": 8, "num_workers": 0})
    run_dir = api.run(path, name="plugin", log=lambda *_: None)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert "gem_backbone.py" in " ".join(summary["weights_notes"])
    # images without a box in the manifest had the detector run once; those where it found nothing are counted
    with open(run_dir / "split.csv", newline="", encoding="utf-8") as f:
        train = {r["path"] for r in csv.DictReader(f) if r["split"] == "train"}
    boxless = [r for r in rows if r["has_annotation"] == "0" and str(data_root / "maskedfacenet_maskon" / r["path"]) in train]
    assert boxless and 0 <= summary["no_face_images"] <= len(boxless)
    assert any("gem_backbone.py" in p for p in api.load_recipe(run_dir / "recipe.resolved.yaml").recipe.plugins)


def test_plugins_command_lists_names_and_origins(tmp_path):
    (tmp_path / "r.yaml").write_text(f"extends: {REPO / 'recipes' / 'soft_aug.yaml'}\n"
                                     f"plugins: [{REPO / 'plugins' / 'face_crop.py'}, "
                                     f"{REPO / 'plugins' / 'gem_backbone.py'}]\n")
    result = CliRunner().invoke(main, ["plugins", str(tmp_path / "r.yaml")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "transforms:" and "backbones:" in lines and "losses:" in lines and "readers:" in lines
    assert any(line.split()[0] == "FaceKeepingCrop" and "face_crop.py:" in line for line in lines[1:])
    assert any(line.split()[0] == "gem_resnet18" and "gem_backbone.py:" in line for line in lines)
    assert any(line.split() == ["focal", "built-in"] for line in lines)
    assert any(line.split() == ["mask_contest", "built-in"] for line in lines)


def test_entry_point_of_an_installed_package_is_found(tmp_path, monkeypatch):
    pkg = tmp_path / "site"
    (pkg / "rare_age_loss").mkdir(parents=True)
    (pkg / "rare_age_loss" / "__init__.py").write_text(textwrap.dedent("""\
        from framework.registry import LOSSES

        @LOSSES.register("rare_age_focal")
        def make(spec, num_classes, weight):
            from framework.loss_modules import FocalLoss
            return FocalLoss(3.0, weight)
        """))
    dist = pkg / "rare_age_loss-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rare-age-loss\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[recipe.plugins]\nrare_age = rare_age_loss\n")
    monkeypatch.syspath_prepend(str(pkg))
    result = CliRunner().invoke(main, ["plugins"])
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if "rare_age_focal" in ln)
    assert "rare_age_loss" in line and "__init__.py" in line
    path = tiny_recipe(tmp_path, train={"epochs": 1, "batch_size": 8, "num_workers": 0,
                                        "loss": {"name": "rare_age_focal"}})
    assert api.load_recipe(path).recipe.train.loss.name == "rare_age_focal"
    LOSSES.unregister("rare_age_focal")


@pytest.mark.parametrize("body,line,words", [
    ("x = 1\nraise ValueError('boom')\n", 2, ["ValueError: boom", "raise ValueError('boom')"]),
    ("def f(:\n    pass\n", 1, ["SyntaxError"]),
    ("import os\nimport not_a_real_module_xyz\n", 2, ["not_a_real_module_xyz", "install"]),
])
def test_broken_plugin_names_its_file_and_line(tmp_path, body, line, words):
    plugin = tmp_path / "broken_plugin.py"
    plugin.write_text(body)
    (tmp_path / "r.yaml").write_text(f"extends: {REPO / 'recipes' / 'soft_aug.yaml'}\nplugins: [broken_plugin.py]\n")
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"{tmp_path / 'r.yaml'}:2:" in result.output and "plugins[0]" in result.output
    assert f"plugin {plugin} line {line}" in result.output
    for w in words:
        assert w in result.output


def test_colliding_names_are_errors_naming_both_origins(tmp_path):
    a, b = tmp_path / "loss_a.py", tmp_path / "loss_b.py"
    for p in (a, b):
        p.write_text("from framework.registry import LOSSES\n\n@LOSSES.register('shared_name_loss')\n"
                     "def make(spec, n, w):\n    return None\n")
    shadow = tmp_path / "shadow.py"
    shadow.write_text("import albumentations as A\nfrom framework.registry import TRANSFORMS\n\n"
                      "@TRANSFORMS.register()\nclass HorizontalFlip(A.HorizontalFlip):\n    pass\n")
    (tmp_path / "r.yaml").write_text(f"extends: {REPO / 'recipes' / 'soft_aug.yaml'}\n"
                                     "plugins: [loss_a.py, loss_b.py]\n")
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2
    assert "registered twice" in result.output and "loss_a.py:3" in result.output and "loss_b.py:3" in result.output
    (tmp_path / "r.yaml").write_text(f"extends: {REPO / 'recipes' / 'soft_aug.yaml'}\nplugins: [shadow.py]\n")
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2
    assert "albumentations.HorizontalFlip" in result.output and "shadow.py:4" in result.output
    LOSSES.unregister("shared_name_loss")
    assert "HorizontalFlip" not in TRANSFORMS


def test_misspelt_plugin_transform_gets_a_did_you_mean(face_crop, tmp_path):
    path = tiny_recipe(tmp_path, plugins=[FACE_CROP], transforms={"train": [{"name": "FaceKepingCrop"}]})
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and "Did you mean 'FaceKeepingCrop'" in result.output


@pytest.mark.parametrize("args,words", [
    ({"p": -1}, "args.p: Input should be greater than 0 (backbone 'gem_test_resnet')"),
    ({"q": 1}, "backbone 'gem_test_resnet' takes no 'args.q' (it takes: p)"),
], ids=["out-of-range", "unknown-key"])
def test_a_plugin_backbones_args_are_checked_by_its_args_model_at_validate(tmp_path, args, words):
    gem = str(REPO / "plugins" / "gem_backbone.py")
    path = tiny_recipe(tmp_path, plugins=[gem], model={"backbone": "gem_test_resnet", "args": args})
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and f"tiny.yaml:{_line_of(path, 'model:')}:1: model: {words}" in result.output, \
        result.output


def test_a_plugin_backbone_gets_the_args_it_registered(tmp_path):
    from framework.models import build_model

    gem = str(REPO / "plugins" / "gem_backbone.py")
    path = tiny_recipe(tmp_path, plugins=[gem], model={"backbone": "gem_test_resnet", "args": {"p": 2.5}})
    api.validate(path)
    model, _ = build_model(api.load_recipe(path).recipe.model, {"label": 3}, (0.5,) * 3, (0.5,) * 3)
    assert [float(m.p.detach()) for m in model.modules() if type(m).__name__ == "GeM"] == [2.5]


def test_a_plugin_backbone_without_an_args_model_refuses_model_args(tmp_path):
    plugin = tmp_path / "plain_backbone.py"
    plugin.write_text(textwrap.dedent("""\
        import timm
        from framework.registry import BACKBONES

        @BACKBONES.register("plain_test_resnet", feature_size=96, input_size=(32, 32))
        def plain():
            return timm.create_model("test_resnet", num_classes=0)
        """))
    path = tiny_recipe(tmp_path, plugins=[str(plugin)], model={"backbone": "plain_test_resnet",
                                                               "args": {"output_stride": 16}})
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "the plugin backbone 'plain_test_resnet'" in result.output and "takes none" in result.output
    assert "register the plugin with args=" in result.output


def _line_of(path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(text))
