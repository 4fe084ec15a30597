"""The command line: every command's --help, validate --print, schema, and a fast start without torch."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
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
    assert schema["required"] == ["data", "model"]
    CliRunner().invoke(main, ["schema", "--out", str(tmp_path / "s.json")])
    assert json.loads((tmp_path / "s.json").read_text()) == schema


def test_run_needs_a_recipe_or_resume():
    result = CliRunner().invoke(main, ["run"])
    assert result.exit_code == 2 and "RECIPE" in result.output


def test_the_commands_users_are_promised_exist():
    assert {"run", "validate", "schema", "plugins", "predict", "evaluate", "ensemble", "explain", "inspect", "compare",
            "sweep"} <= set(main.commands)


def test_help_and_validate_do_not_import_torch():
    code = ("import sys; from click.testing import CliRunner; from framework.cli import main; "
            f"r = CliRunner().invoke(main, ['validate', {str(REPO / 'recipes' / 'hard_aug.yaml')!r}]); "
            "assert r.exit_code == 0, r.output; print('torch' in sys.modules, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_nothing_phones_home_at_import():
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("NO_ALBUMENTATIONS_UPDATE", "HF_HUB_OFFLINE")}
    code = "import os, framework; print(os.environ['NO_ALBUMENTATIONS_UPDATE'], os.environ['HF_HUB_OFFLINE'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.stdout.split() == ["1", "1"], out.stderr
