"""The command line: every command's --help, validate --print, schema, and a fast start without torch."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from framework.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [[]] + [[name] for name in sorted(main.commands)])
def test_every_command_has_help(command):
    result = CliRunner().invoke(main, command + ["--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_validate_print_shows_resolved_recipe_and_classes():
    result = CliRunner().invoke(main, ["validate", str(REPO / "recipes" / "hard_aug.yaml"), "--print"])
    assert result.exit_code == 0, result.output
    assert "RandomResizedCrop" in result.output and "backbone: resnet10t" in result.output
    assert "#     1  incorrect" in result.output
    assert "ok: " in result.output and "train /" in result.output


def test_validate_warns_about_vertical_flips_on_faces():
    result = CliRunner().invoke(main, ["validate", str(REPO / "recipes" / "soft_aug.yaml"),
                                       "--set", "transforms.train.0.name=VerticalFlip"])
    assert result.exit_code == 0
    assert "warning:" in result.output and "VerticalFlip turns faces upside down" in result.output


def test_schema_is_json_schema_of_the_recipe(tmp_path):
    result = CliRunner().invoke(main, ["schema"])
    schema = json.loads(result.output)
    assert {"data", "model", "train", "validation", "transforms"} <= set(schema["properties"])
    assert "required" not in schema and "extends" in schema["properties"]  # a file may extend another, partially
    CliRunner().invoke(main, ["schema", "--out", str(tmp_path / "s.json")])
    assert json.loads((tmp_path / "s.json").read_text()) == schema


def test_run_needs_a_recipe_or_resume():
    result = CliRunner().invoke(main, ["run"])
    assert result.exit_code == 2 and "RECIPE" in result.output


def test_the_commands_users_are_promised_exist():
    assert {"run", "validate", "schema", "plugins", "predict", "evaluate", "ensemble", "explain", "inspect", "compare",
            "sweep", "export", "crossval"} <= set(main.commands)


def test_help_does_not_import_torch():
    """`recipe --help` and a command's --help are instant; `validate` imports timm on purpose (it checks that the
    backbone exists and takes the image size: the checks `run` would otherwise fail on later)."""
    code = ("import sys; from click.testing import CliRunner; from framework.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); s = CliRunner().invoke(main, ['run', '--help']); "
            "assert r.exit_code == s.exit_code == 0, r.output; print('torch' in sys.modules, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_importing_the_library_leaves_the_environment_alone_and_the_cli_sets_its_defaults():
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("NO_ALBUMENTATIONS_UPDATE", "HF_HUB_OFFLINE", "OMP_WAIT_POLICY")}
    code = ("import os, framework, framework.transforms as T; T.albumentations(); "
            "print([os.environ.get(k) for k in ('NO_ALBUMENTATIONS_UPDATE', 'HF_HUB_OFFLINE', 'OMP_WAIT_POLICY')]); "
            "from click.testing import CliRunner; from framework.cli import main; "
            "assert CliRunner().invoke(main, ['schema']).exit_code == 0; "
            "print([os.environ.get(k) for k in ('NO_ALBUMENTATIONS_UPDATE', 'HF_HUB_OFFLINE', 'OMP_WAIT_POLICY')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[None, None, None]", "['1', '1', 'PASSIVE']"]


def test_the_last_line_of_a_run_is_rounded_like_the_epoch_lines(tmp_path):
    from tests.conftest import tiny_recipe

    path = tiny_recipe(tmp_path, train={"epochs": 1, "batch_size": 8, "num_workers": 0})
    result = CliRunner().invoke(main, ["run", str(path), "--name", "r"])
    assert result.exit_code == 0, result.output
    done = next(line for line in result.output.splitlines() if line.startswith("done:"))
    assert re.search(r"best val/macro_f1 = \d\.\d{4} at epoch 1 ", done), done


def test_the_editor_schema_accepts_every_shipped_recipe_and_rejects_broken_ones():
    """`recipe schema` describes recipe files as written: partial files that `extends` others validate; an
    unknown key, a wrong type or an unknown source type does not. recipe.schema.json (what .vscode/settings.json
    points editors at) is the command's output."""
    import json

    import jsonschema
    import yaml

    from framework import api

    schema = api.schema()
    repo = Path(__file__).resolve().parents[1]
    assert json.loads((repo / "recipe.schema.json").read_text()) == schema, "run: recipe schema --out recipe.schema.json"
    validator = jsonschema.Draft202012Validator(schema)
    recipes = sorted((repo / "recipes").glob("*.yaml"))
    assert len(recipes) > 10
    for path in recipes:
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert not errors, f"{path.name}: {errors[:3]}"
    broken = [{"extends": "base.yaml", "train": {"lr": 0.001}},  # lr belongs in train.optimizer
              {"train": {"epochs": "ten"}},
              {"data": {"sources": [{"type": "csv", "name": "a", "manifest": "m.csv", "colour": "x"}]}},
              {"train": {"optimizer": {"name": "adamw", "momentum": 0.9}}}]
    for recipe in broken:
        assert list(validator.iter_errors(recipe)), recipe


def test_validate_print_shows_the_image_size_auto_stands_for(tmp_path):
    from tests.conftest import tiny_recipe

    path = tiny_recipe(tmp_path, model={"backbone": "resnet10t"}, transforms={"image_size": "auto"})
    result = CliRunner().invoke(main, ["validate", str(path), "--print"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output.split("\n#")[0].split("ok:")[0])
    import timm

    assert printed["transforms"]["image_size"] == list(timm.get_pretrained_cfg("resnet10t").input_size[1:])


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shell_completion_scripts_as_the_readme_gives_them(shell):
    out = subprocess.run(["recipe"], env={**__import__("os").environ, "_RECIPE_COMPLETE": f"{shell}_source"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "_RECIPE_COMPLETE" in out.stdout, out.stderr


def test_several_processes_fail_with_their_own_message_and_code_not_torchruns_traceback():
    """`recipe run --processes N` passes the processes' stderr through without torchrun's report of the failure."""
    import io

    from framework.cli_launch import _without_launcher_traceback

    stderr = io.StringIO(
        "r.yaml:1:1: model: required field 'model' is missing. Fix: add `model: ...` under the top level.\n"
        "E1204 15:55:50.376000 9017 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 2) "
        "local_rank: 0 (pid: 9043) of binary: python\n"
        "Traceback (most recent call last):\n  File \"run.py\", line 1, in <module>\n    main()\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        "============================================================\nframework.cli FAILED\n")
    out = io.StringIO()
    assert _without_launcher_traceback(stderr, out) == 2
    assert out.getvalue() == ("r.yaml:1:1: model: required field 'model' is missing. Fix: add `model: ...` under "
                              "the top level.\n")
    other = io.StringIO("Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: a real bug\n")
    out = io.StringIO()
    assert _without_launcher_traceback(other, out) == 0 and "ValueError: a real bug" in out.getvalue()
