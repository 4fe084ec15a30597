"""A table of broken recipes: each gives exit code 2 and a message naming the file, line and field."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from framework.cli import main

BASE = """\
data:
  root: ROOT
  sources:
    - {type: csv, name: maskon, manifest: maskedfacenet_maskon/manifest.csv, group_column: group}
  target: {column: mask_state, classes: [wear, incorrect, not_wear]}
model: {backbone: resnet18}
validation: {type: holdout, ratio: 0.2}
transforms:
  image_size: 64
  train:
    - {name: HorizontalFlip}
train: {epochs: 3, batch_size: 16}
"""

# (id, (old, new) edit of BASE, expected line, expected field, words the message must contain)
CASES = [
    ("typo-section", ("train: {", "trian: {"), 12, "trian", ["unknown key", "Did you mean 'train'"]),
    ("typo-key", ("epochs: 3", "epoch: 3"), 12, "train.epoch", ["Did you mean 'epochs'"]),
    ("wrong-type", ("epochs: 3", "epochs: many"), 12, "train.epochs", ["valid integer", "'many'"]),
    ("out-of-range", ("ratio: 0.2", "ratio: 1.5"), 7, "validation.ratio", ["less than 1"]),
    ("unknown-policy", ("type: holdout", "type: holdot"), 7, "validation", ["Did you mean 'holdout'"]),
    ("missing-section", ("model: {backbone: resnet18}\n", ""), None, "model", ["required field 'model'"]),
    ("unknown-transform", ("name: HorizontalFlip", "name: HorizontlFlip"), 11, "transforms.train[0].name",
     ["Did you mean 'HorizontalFlip'"]),
    ("bad-transform-arg", ("name: HorizontalFlip", "name: HorizontalFlip, p: 2"), 11, "transforms.train[0].p",
     ["less than or equal to 1"]),
    ("unknown-transform-arg", ("name: HorizontalFlip", "name: Rotate, limitt: 10"), 11,
     "transforms.train[0].limitt", ["Did you mean 'limit'"]),
    ("missing-manifest", ("maskedfacenet_maskon/manifest.csv", "nowhere/manifest.csv"), 4,
     "data.sources[0].manifest", ["manifest not found", "nowhere/manifest.csv"]),
    ("missing-root", ("root: ROOT", "root: /no/such/folder"), 2, "data.root", ["/no/such/folder"]),
    ("missing-column", ("column: mask_state", "column: mask_sate"), 5, "data.target.column",
     ["Did you mean 'mask_state'"]),
    ("undeclared-label", ("classes: [wear, incorrect, not_wear]", "classes: [wear, not_wear]"), 5,
     "data.target.classes", ["'incorrect'", "map"]),
    ("bad-yaml", ("image_size: 64", "image_size: [64, 64"), 10, "", ["invalid YAML"]),
    ("duplicate-key", ("  image_size: 64\n", "  image_size: 64\n  image_size: 32\n"), 10, "", ["appears twice"]),
    ("fold-out-of-range", ("{type: holdout, ratio: 0.2}", "{type: kfold, k: 3, fold: 3}"), 7, "validation",
     ["fold must be below k=3"]),
    ("unknown-source", ("{type: holdout, ratio: 0.2}", "{type: source, source: external}"), 7,
     "validation.source", ["no data source is named 'external'"]),
    ("bad-bins", ("{column: mask_state, classes: [wear, incorrect, not_wear]}", "{column: age, bins: [60, 30]}"),
     5, "data.target.bins", ["strictly increasing"]),
    ("missing-base", ("data:\n", "extends: nowhere.yaml\ndata:\n"), 1, "extends", ["nowhere.yaml", "does not exist"]),
    ("key-elsewhere", ("epochs: 3", "lr: 0.1, epochs: 3"), 12, "train.lr", ["Did you mean 'train.optimizer.lr'?"]),
    ("infinite-lr", ("train: {epochs: 3", "train: {optimizer: {lr: .inf}, epochs: 3"), 12, "train.optimizer.lr",
     ["finite number"]),
    ("nan-ratio", ("ratio: 0.2", "ratio: .nan"), 7, "validation.ratio", ["finite number"]),
    ("huge-image", ("image_size: 64", "image_size: 100000"), 9, "transforms.image_size", ["above 4096"]),
    ("huge-epochs", ("epochs: 3", "epochs: 1e29"), 12, "train.epochs", ["1e+29"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_broken_recipe_gives_exit_2_and_names_line_and_field(tmp_path, data_root, case):
    _, (old, new), line, field, words = case
    assert old in BASE, "the edit must apply"
    path = tmp_path / "broken.yaml"
    path.write_text(BASE.replace(old, new, 1).replace("ROOT", str(data_root)))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    out = result.output
    assert "Traceback" not in out
    if line is not None:
        assert f"{path}:{line}:" in out, out
    else:
        assert str(path) in out, out
    if field:
        assert f": {field}: " in out, out
    for w in words:
        assert w in out, out
    assert "Fix:" in out, out


def test_extends_cycle_exit_2(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "a.yaml")])
    assert result.exit_code == 2
    assert "cycle: a.yaml -> b.yaml -> a.yaml" in result.output and "extends" in result.output


def test_several_errors_are_all_reported(tmp_path, data_root):
    text = BASE.replace("ROOT", str(data_root)).replace("epochs: 3", "epochs: -1").replace("ratio: 0.2", "ratio: 2")
    (tmp_path / "r.yaml").write_text(text)
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2
    assert "recipe errors (2)" in result.output
    assert "train.epochs" in result.output and "validation.ratio" in result.output


def test_bad_override_names_the_command_line(tmp_path, data_root):
    (tmp_path / "r.yaml").write_text(BASE.replace("ROOT", str(data_root)))
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "r.yaml"), "--set", "train.batch_size=0"])
    assert result.exit_code == 2
    assert "--set: train.batch_size" in result.output
