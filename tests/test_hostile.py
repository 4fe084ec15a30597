"""Untrusted inputs: run folders, recipes and checkpoints from others never run code, hang or end in a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from framework import api
from tests.conftest import tiny_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """A finished run folder, then doctored as a shared one could be: its recipe lists `evil.py`, which sits
    beside it and writes a marker file when imported."""
    tmp = tmp_path_factory.mktemp("shared")
    run_dir = api.run(tiny_recipe(tmp, train={"epochs": 1, "batch_size": 8, "num_workers": 0}), name="shared",
                      log=lambda *_: None)
    marker = tmp / "evil_ran"
    (run_dir / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    resolved = run_dir / "recipe.resolved.yaml"
    recipe = yaml.safe_load(resolved.read_text())
    recipe["plugins"] = [str(run_dir / "evil.py")]
    resolved.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return run_dir, marker


def _cli(*args) -> subprocess.CompletedProcess:
    """The command in its own process: a plugin imported by an earlier test cannot count as trusted."""
    return subprocess.run([sys.executable, "-m", "framework.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["predict", "evaluate", "explain"])
def test_a_run_folder_never_runs_the_plugin_code_it_names(shared_run, tmp_path, command):
    run_dir, marker = shared_run
    data = run_dir.parent.parent / "tiny.csv"
    args = {"predict": ["predict", run_dir, "--csv", data, "--out", tmp_path / "p.csv"],
            "evaluate": ["evaluate", run_dir, "--csv", data, "--out", tmp_path / "e"],
            "explain": ["explain", run_dir, data, "--out", tmp_path / "x"]}[command]
    out = _cli(*args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert not marker.exists(), "the run folder's plugin ran"
    assert "evil.py" in out.stderr and "--plugin" in out.stderr and "Traceback" not in out.stderr
    trusted = _cli(*args, "--plugin", run_dir / "evil.py")  # the user's explicit choice
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    assert marker.exists()
    marker.unlink()
