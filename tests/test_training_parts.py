"""Losses, class weights, samplers, metrics, checkpoints pruning and the LR schedule, on small arrays."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from framework.engine.metrics import confusion, scores
from framework.data.loaders import EpochSampler
from framework.engine.checkpoint import prune as _prune
from framework.optim import lr_lambda
from framework.loss_modules import FocalLoss, SoftF1Loss, class_weights
from framework.recipe.schema import Cosine, LossSpec, StepLR


def test_metrics_from_the_confusion_matrix_by_hand():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 1, 0]
    cm = confusion(y_true, y_pred, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    s = scores(cm, ["a", "b", "c"])
    assert s["accuracy"] == pytest.approx(4 / 6)
    # a: P=2/3 R=2/3 F1=2/3; b: P=2/3 R=1 F1=0.8; c: P=0 R=0 F1=0 (never predicted but present: counts)
    assert s["per_class"]["b"]["f1"] == pytest.approx(0.8)
    assert s["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    assert s["per_class"]["c"]["support"] == 1


def test_auto_class_weights_are_inverse_frequency():
    w = class_weights("auto", [0] * 8 + [1] * 2, 3)
    assert w.tolist() == pytest.approx([10 / (3 * 8), 10 / (3 * 2), 0.0])
    assert class_weights("none", [0, 1], 2) is None


def test_focal_loss_with_gamma_zero_is_cross_entropy():
    logits, target = torch.randn(16, 4), torch.randint(0, 4, (16,))
    assert FocalLoss(0.0)(logits, target) == pytest.approx(float(F.cross_entropy(logits, target)), rel=1e-5)
    assert FocalLoss(2.0)(logits, target) < F.cross_entropy(logits, target)


def test_soft_f1_loss_is_lower_for_better_predictions():
    target = torch.tensor([0, 0, 1, 2])
    good = F.one_hot(target, 3).float() * 8
    bad = torch.roll(good, 1, dims=1)
    loss = SoftF1Loss(3)
    assert loss(good, target) < loss(bad, target)


def test_balanced_and_sqrt_samplers_draw_rare_classes_more_often_and_resume_by_epoch():
    labels = [0] * 90 + [1] * 10
    s = EpochSampler(labels, seed=3, mode="balanced")
    s.set_epoch(1)
    drawn = [labels[i] for _, i in s]
    assert 0.35 < np.mean(drawn) < 0.65
    again = EpochSampler(labels, seed=3, mode="balanced")
    again.set_epoch(1)
    assert list(again) == list(s)  # depends only on (seed, epoch)
    sqrt = EpochSampler(labels, seed=3, mode="sqrt")  # class shares sqrt(90) : sqrt(10) = 0.75 : 0.25
    sqrt.set_epoch(1)
    assert 0.15 < np.mean([labels[i] for _, i in sqrt]) < 0.35
    plain = EpochSampler(labels, seed=3)
    plain.set_epoch(2)
    assert sorted(i for _, i in plain) == list(range(100)) and {e for e, _ in plain} == {2}


def test_cosine_schedule_warms_up_then_decays():
    f = lr_lambda(Cosine(name="cosine", warmup_epochs=1, min_lr_ratio=0.1), steps_per_epoch=10, total_steps=100)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0, abs=0.01) and f(99) == pytest.approx(0.1, abs=0.01)
    step = lr_lambda(StepLR(name="step", every_epochs=2, gamma=0.5), steps_per_epoch=10, total_steps=100)
    assert [step(s) for s in (0, 19, 20, 40)] == [1.0, 1.0, 0.5, 0.25]


def test_keep_last_prunes_old_numbered_checkpoints(tmp_path):
    for e in range(1, 6):
        (tmp_path / f"epoch_{e:04d}.pt").write_bytes(b"x")
    (tmp_path / "best.pt").write_bytes(b"x")
    _prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "epoch_0004.pt", "epoch_0005.pt"]


def test_loss_spec_names_come_from_the_registry():
    assert LossSpec(name="focal").name == "focal"
    with pytest.raises(ValueError, match="Did you mean 'focal'"):
        LossSpec(name="focall")


def test_ema_update_averages_floats_copies_counts_and_warms_up():
    from framework.optim import ema_copy as _ema_copy, ema_update

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = _ema_copy(model)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[1].num_batches_tracked.fill_(7)
    ema_update(ema, model, decay=0.9, step=1000)  # past the warm-up: d = 0.9
    now, m = {k: v.clone() for k, v in ema.state_dict().items()}, model.state_dict()
    for k in ("0.weight", "0.bias", "1.weight", "1.bias"):
        assert torch.allclose(now[k], 0.9 * before[k] + 0.1 * m[k])
    assert int(now["1.num_batches_tracked"]) == 7
    assert not any(p.requires_grad for p in ema.parameters())
    ema_update(ema, model, decay=0.999, step=0)  # first step: d = 1/10, the average jumps to the model
    assert torch.allclose(ema.state_dict()["0.weight"], 0.1 * now["0.weight"] + 0.9 * m["0.weight"])


def test_model_args_reach_timm_and_a_wrong_one_names_the_field():
    from framework.errors import FieldError
    from framework.models import build_model
    from framework.recipe.schema import ModelSection

    x = torch.zeros(1, 3, 64, 64)
    mean, std = (0.5,) * 3, (0.25,) * 3
    plain, _ = build_model(ModelSection(backbone="resnet10t"), {"mask": 3}, mean, std)
    finer, _ = build_model(ModelSection(backbone="resnet10t", args={"output_stride": 16}), {"mask": 3}, mean, std)
    assert plain.net.features.forward_features(x).shape[-1] == 2
    assert finer.net.features.forward_features(x).shape[-1] == 4  # last stage dilated instead of strided
    with pytest.raises(FieldError) as e:
        build_model(ModelSection(backbone="resnet10t", args={"no_such_option": 1}), {"mask": 3}, mean, std)
    (where, message, fix), = e.value.items
    assert where == ("model", "args") and "no_such_option" in message and "model.args" in fix


@pytest.mark.parametrize("backbone", ["mobilenetv3_small_050", "lcnet_050", "resnet10t"])
def test_heads_fit_the_pooled_features_also_after_a_conv_head(backbone):
    """mobilenetv3 and lcnet widen their pooled features with a 1x1 conv (576 -> 1024 for mobilenetv3_small):
    the task heads take that width, not the backbone's num_features."""
    from framework.models import build_model
    from framework.recipe.schema import ModelSection

    model, _ = build_model(ModelSection(backbone=backbone), {"mask": 3, "age": 1}, (0.5,) * 3, (0.25,) * 3)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)
        width = model.net.features(images.float()).shape[1]
    assert out["mask"].shape == (2, 3) and out["age"].shape == (2, 1)
    assert model.net.heads["mask"].in_features == width


@pytest.mark.parametrize("backbone", ["test_vit3", "test_maxvit", "test_coatnet"])
def test_a_backbone_of_one_input_size_is_built_for_the_recipes_size(backbone):
    """ViT-like backbones are built for 160 px here; at 64 px they fail (position embeddings, windows) unless
    built for that size, which is what a sweep over image sizes needs."""
    from framework.backbones import fixed_input_size
    from framework.models import build_model
    from framework.recipe.schema import ModelSection

    assert fixed_input_size(backbone) == (160, 160) and fixed_input_size("resnet10t") is None
    model, notes = build_model(ModelSection(backbone=backbone), {"mask": 3}, (0.5,) * 3, (0.25,) * 3, (64, 64))
    with torch.no_grad():
        out = model(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert out["mask"].shape == (2, 3)
    assert any("built for 64x64 inputs (its default is 160x160)" in n for n in notes)


def test_a_class_absent_from_the_data_is_left_out_of_macro_f1_and_named():
    """A 3-class model on a 2-class set: its stray predictions of the third class cost the others their recall,
    but the absent class is not averaged in as an F1 of 0 (0.615 instead of 0.92 for hard_aug on chandrikadeb7)."""
    from framework.engine.metrics import confusion, format_report, scores

    y_true = np.array([0] * 10 + [2] * 10)
    y_pred = np.array([0] * 9 + [1] + [2] * 10)  # one `wear` face called `incorrect`, a class the set lacks
    s = scores(confusion(y_true, y_pred, 3), ["wear", "incorrect", "not_wear"])
    f1_wear = 2 * 1.0 * 0.9 / 1.9
    assert s["macro_f1"] == pytest.approx((f1_wear + 1.0) / 2) and s["absent"] == ["incorrect"]
    assert "incorrect never occur in this data" in format_report(s)


def test_confusion_matrix_columns_are_labelled_with_class_names():
    """Columns carry the class names (they used to read 0/1/2): the cells widen to fit the longest name, and the
    label row under the matrix holds ink below every column."""
    from framework.engine.tb import confusion_image

    cm = np.array([[3, 1], [0, 4]])
    narrow = confusion_image(cm, ["a", "b"])
    wide = confusion_image(cm, ["incorrect", "not_wear"])
    assert wide.shape[1] > narrow.shape[1]
    label_row = wide[-18:-2]  # the names under the columns
    assert (label_row < 128).any(axis=(0, 2)).sum() > 20  # dark pixels: text across the columns
