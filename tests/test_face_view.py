"""`transforms.resize.face_margin`: the resize stage crops each image to its face before fitting it.

Checked on the real kaggle crops (faces with their boxes from the manifest) and end to end: a run trained on face
crops predicts and evaluates from the same face regions (boxes from a CSV, or the detector), not the whole image."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from framework.data.dataset import resize_one
from framework.recipe.schema import ResizeSpec
from framework.transforms import face_region, resize_stage
from tests.conftest import tiny_recipe


def _kaggle_rows(data_root, n: int, state: str | None = None) -> list[dict]:
    with open(data_root / "face_mask_kaggle3" / "crops_manifest.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if state is None or r["mask_state"] == state]
    return rows[:n]


@given(x0=st.integers(0, 90), y0=st.integers(0, 90), bw=st.integers(1, 60), bh=st.integers(1, 60),
       margin=st.floats(0, 1))
def test_face_region_is_a_square_around_the_box_clipped_to_the_image(x0, y0, bw, bh, margin):
    w, h = 100, 120
    box = (x0, y0, min(w, x0 + bw), min(h, y0 + bh))
    region = face_region(box, w, h, margin)
    rx0, ry0, rx1, ry1 = region
    assert 0 <= rx0 < rx1 <= w and 0 <= ry0 < ry1 <= h
    # the whole box is inside (up to rounding), and the region is never larger than the grown square
    assert rx0 <= box[0] + 0.5 and ry0 <= box[1] + 0.5 and rx1 >= box[2] - 0.5 and ry1 >= box[3] - 0.5
    side = max(box[2] - box[0], box[3] - box[1]) * (1 + 2 * margin)
    assert rx1 - rx0 <= side + 1 and ry1 - ry0 <= side + 1
    if rx0 > 0 and rx1 < w and ry0 > 0 and ry1 < h:  # not clipped: a square of that side
        assert abs((rx1 - rx0) - side) <= 1 and abs((ry1 - ry0) - side) <= 1


def test_face_region_of_an_empty_box_is_none():
    assert face_region((10, 10, 10.5, 30), 100, 100, 0.2) is None


@pytest.mark.parametrize("mode", ["pad", "stretch", "crop"])
def test_resize_stage_fills_the_input_with_the_face_on_real_crops(data_root, mode):
    """Kaggle crops are the face box grown by 50% per side: without the face crop the face spans about half of the
    input; with margin 0.1 it spans 1 / 1.2 of it (the crop is clipped where the face touches the photo's border)."""
    plain = resize_stage((64, 64), ResizeSpec(mode=mode), with_boxes=True)
    face = resize_stage((64, 64), ResizeSpec(mode=mode, face_margin=0.1))
    spans_plain, spans_face = [], []
    for r in _kaggle_rows(data_root, 40):
        path = str(data_root / "face_mask_kaggle3" / r["path"])
        box = tuple(float(r[c]) for c in ("xmin", "ymin", "xmax", "ymax"))
        image_p, box_p = resize_one(path, box, plain)
        image_f, box_f = resize_one(path, box, face)
        assert image_p.shape == image_f.shape == (64, 64, 3)
        spans_plain.append(max(box_p[2] - box_p[0], box_p[3] - box_p[1]) / 64)
        spans_face.append(max(box_f[2] - box_f[0], box_f[3] - box_f[1]) / 64)
    assert np.median(spans_plain) < 0.6
    if mode != "crop":  # crop mode cuts the longer side, so the box can be cut too
        assert np.median(spans_face) == pytest.approx(1 / 1.2, abs=0.05)
    assert np.median(spans_face) > 1.4 * np.median(spans_plain)


def test_resize_stage_without_a_box_uses_the_whole_image(data_root):
    r = _kaggle_rows(data_root, 1)[0]
    path = str(data_root / "face_mask_kaggle3" / r["path"])
    plain = resize_stage((48, 48), ResizeSpec(mode="pad"))
    face = resize_stage((48, 48), ResizeSpec(mode="pad", face_margin=0.2))
    image_f, box = resize_one(path, None, face)
    assert box is None
    np.testing.assert_array_equal(image_f, resize_one(path, None, plain)[0])


def test_face_margin_out_of_range_is_a_recipe_error(tmp_path):
    from framework.recipe.loaded import load_recipe
    from framework.errors import RecipeError

    path = tiny_recipe(tmp_path, transforms={"image_size": 32, "resize": {"face_margin": -0.1}})
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert "face_margin" in str(e.value)


@pytest.mark.slow
def test_face_cropping_run_predicts_from_the_same_face_regions(tmp_path, data_root):
    """Train on kaggle face crops with boxes; `predict --csv` and `evaluate --csv` with the box columns must see the
    face regions (the same probabilities as predicting with the boxes directly), not the whole crops."""
    from framework import api
    from framework.inference import predict as P, run as R

    rows = [r for s in ("wear", "incorrect", "not_wear") for r in _kaggle_rows(data_root, 10, s)]
    manifest = tmp_path / "faces.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["path", "mask_state", "group", "xmin", "ymin", "xmax", "ymax"])
        w.writeheader()
        for r in rows:
            w.writerow({"path": str(data_root / "face_mask_kaggle3" / r["path"]), "mask_state": r["mask_state"],
                        "group": r["group"], **{c: r[c] for c in ("xmin", "ymin", "xmax", "ymax")}})
    recipe = tiny_recipe(tmp_path, data={"sources": [{"type": "csv", "allow_outside_root": True,
                                                      "name": "k", "manifest": "faces.csv",
                                                      "group_column": "group",
                                                      "box_columns": ["xmin", "ymin", "xmax", "ymax"]}]},
                         transforms={"image_size": 32, "resize": {"face_margin": 0.1},
                                     "train": [{"name": "HorizontalFlip"}]},
                         train={"epochs": 1, "batch_size": 8, "num_workers": 0})
    run = api.run(recipe, name="face")
    loaded = R.load_run(run)
    boxes = R.face_boxes(loaded, manifest)
    assert boxes is not None and all(b is not None for b in boxes)
    paths = R.list_images(csv_file=manifest).paths
    pred = P.predict_tasks(loaded, paths, boxes=boxes)
    with_boxes, ok = pred.probs, pred.ok
    whole = P.predict_tasks(loaded, paths, boxes=[(0, 0, 1e6, 1e6)] * len(paths)).probs  # clipped: whole image
    assert len(ok) == len(paths)
    assert not np.allclose(with_boxes["label"], whole["label"])  # the box changes what the model sees

    result = api.predict(run, manifest, out=tmp_path / "pred.csv", proba=True)
    assert result["predicted"] == len(paths)
    with open(tmp_path / "pred.csv", newline="", encoding="utf-8") as f:
        written = list(csv.DictReader(f))
    got = np.array([[float(r[f"label:{c}"]) for c in ("wear", "incorrect", "not_wear")] for r in written])
    np.testing.assert_allclose(got, with_boxes["label"], atol=1e-4)

    truth = {"wear": 0, "incorrect": 1, "not_wear": 2}
    expected = np.mean(with_boxes["label"].argmax(1) == np.array([truth[r["mask_state"]] for r in rows]))
    metrics = api.evaluate(run, manifest, out=tmp_path / "eval")["metrics"]
    assert metrics["accuracy"] == pytest.approx(expected)

    # prior-shift calibration is fitted on the outputs it calibrates: validation faces cropped by the data's boxes,
    # with the TTA asked for (each its own cached fit)
    from framework.inference.priors import calibration, fit_bcts

    with open(run / "split.csv", newline="", encoding="utf-8") as f:
        val = [r for r in csv.DictReader(f) if r["split"] == "val"]
    val_boxes = [boxes[paths.index(r["path"])] for r in val]
    y = np.array([truth[r["label"]] for r in val])
    for tta in ("none", "hflip"):
        probs = P.predict_proba(loaded, [r["path"] for r in val], tta, boxes=val_boxes).probs
        t, b = fit_bcts(probs["label"], y)
        fitted = calibration(loaded, tta)["label"]
        assert fitted["temperature"] == pytest.approx(t) and fitted["bias"] == pytest.approx(b)
        assert json.loads((run / "calibration.json").read_text())["checkpoint"].endswith(f"tta={tta}")

    # Grad-CAM shows what the model saw: the face region (boxes looked up in the run's own data), not the crop
    from PIL import Image

    from framework.review.explain import explain

    items = explain(run, [paths[0], paths[-1]], tmp_path / "cam")["items"]
    for it, k in zip(items, (0, len(paths) - 1)):
        w, h = Image.open(paths[k]).size
        x0, y0, x1, y1 = face_region(boxes[k], w, h, 0.1)
        assert it["image"].shape[:2] == it["heat"].shape == (y1 - y0, x1 - x0) != (h, w)
