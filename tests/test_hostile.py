"""Untrusted inputs: run folders, recipes and checkpoints from others never run code, hang or end in a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

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


def _clean_copy(run_dir: Path, to: Path, **changes) -> Path:
    """A copy of the shared run without its doctored plugin list (and with `changes` to its recipe's sections)."""
    import shutil

    shutil.copytree(run_dir, to)
    resolved = to / "recipe.resolved.yaml"
    recipe = yaml.safe_load(resolved.read_text())
    recipe["plugins"] = []
    for key, value in changes.items():  # "section.field": value
        section, field = key.split(".")
        recipe[section][field] = value
    resolved.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return to


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



@pytest.mark.slow
def test_resuming_a_run_folder_imports_its_plugins_only_when_named(tmp_path):
    """A run trained with a plugin: `--resume` alone refuses (naming it), `--resume --plugin` continues."""
    marker = tmp_path / "plugin_ran"
    plugin = tmp_path / "harmless.py"
    plugin.write_text(f"open({str(marker)!r}, 'a').write('ran')\n")
    recipe = tiny_recipe(tmp_path, plugins=[str(plugin)], train={"epochs": 1, "batch_size": 8, "num_workers": 0})
    assert _cli("run", recipe, "--name", "r").returncode == 0
    marker.unlink()
    args = ["run", "--resume", tmp_path / "runs" / "r", "--set", "train.epochs=2"]
    out = _cli(*args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert not marker.exists(), "the run folder's plugin ran"
    assert "harmless.py" in out.stderr and "--plugin" in out.stderr and "Traceback" not in out.stderr
    trusted = _cli(*args, "--plugin", plugin)
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    assert marker.exists() and "epoch 2/2" in trusted.stdout

BOMB = ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
        "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nnotes: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n")


@pytest.mark.parametrize("text,words", [
    (BOMB, "expands to more than 20,000 values"),  # 10^6 values from 300 bytes
    ("notes: &x [*x]\n", "more than 50 levels"),  # an alias inside itself
    ("notes: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),  # PyYAML recursed into a RecursionError
    ("extends: bomb.yaml\nnotes: hi\n", "expands to more than 20,000 values"),  # through `extends`
    ("model: {backbone: resnet10t}\n", "--set: the YAML expands"),  # in a --set value
], ids=["alias-bomb", "self-alias", "deep-nesting", "bomb-via-extends", "bomb-in-set"])
def test_yaml_that_expands_without_end_is_a_located_error(tmp_path, text, words):
    from click.testing import CliRunner

    from framework.cli import main

    (tmp_path / "bomb.yaml").write_text(BOMB)
    path = tmp_path / "r.yaml"
    path.write_text(text)
    sets = ["--set", "notes=[&a [1, 1, 1, 1, 1, 1, 1, 1], &b [*a, *a, *a, *a, *a, *a, *a, *a], "
                     "&c [*b, *b, *b, *b, *b, *b, *b, *b], &d [*c, *c, *c, *c, *c, *c, *c, *c], "
                     "[*d, *d, *d, *d, *d, *d, *d, *d]]"] if "--set" in words else []
    result = CliRunner().invoke(main, ["validate", str(path), *sets])
    assert result.exit_code == 2 and words in result.output, result.output
    assert "Traceback" not in result.output and "RecursionError" not in result.output


def test_location_merging_over_extends_keeps_the_childs_places_and_drops_replaced_ones(tmp_path):
    from framework.recipe.load import load_dict

    items = "\n".join(f"  k{i}: [{i}, {i + 1}]" for i in range(2000))
    (tmp_path / "base.yaml").write_text("notes: x\nmeta:\n" + items + "\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nmeta:\n  k7: other\n")
    data, locs = load_dict(tmp_path / "child.yaml")
    assert data["meta"]["k7"] == "other" and data["meta"]["k8"] == [8, 9]
    assert locs[("meta", "k7")][0].endswith("child.yaml") and locs[("meta", "k8")][0].endswith("base.yaml")
    assert ("meta", "k7", 0) not in locs  # the base's list was replaced by a string


_SCALAR = st.sampled_from(["x", "1", "2.5", "true", "null", "'a b'"])


@st.composite
def _yaml_documents(draw):
    """YAML text with anchors, aliases (to earlier anchors, or to an anchor being defined) and nesting."""
    anchors: list[str] = []

    def value(depth):
        kind = draw(st.sampled_from(["scalar", "list", "map", "alias"] if depth < 6 else ["scalar", "alias"]))
        if kind == "alias" and anchors:
            return "*" + draw(st.sampled_from(anchors))
        if kind in ("scalar", "alias"):
            return draw(_SCALAR)
        anchor = ""
        if draw(st.booleans()):
            anchors.append(f"a{len(anchors)}")
            anchor = f"&{anchors[-1]} "
        n = draw(st.integers(0, 6))
        if kind == "list":
            return anchor + "[" + ", ".join(value(depth + 1) for _ in range(n)) + "]"
        return anchor + "{" + ", ".join(f"k{i}: {value(depth + 1)}" for i in range(n)) + "}"

    return "notes: " + value(0) + "\n"


@settings(max_examples=150, deadline=None)
@given(_yaml_documents())
def test_fuzzed_yaml_with_aliases_and_nesting_loads_or_fails_clearly(tmp_path_factory, text):
    """Whatever the aliases and nesting, reading a recipe either gives bounded data or a RecipeError (work is
    bounded by MAX_NODES, so no case can hang)."""
    from framework.errors import RecipeError
    from framework.recipe.load import MAX_NODES, load_dict

    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(text)
    try:
        data, locs = load_dict(path)
    except RecipeError as e:
        assert e.issues[0].file and e.issues[0].message
        return
    assert len(locs) <= MAX_NODES + 10


def test_a_device_named_as_an_image_is_refused_not_read(tmp_path):
    """/dev/zero in a manifest: reading it never ends (it hung a disk-cached run at 1 GB while hashing). Only
    regular files are opened; validate names it, and a skipping run lists it."""
    import csv

    from click.testing import CliRunner

    from framework.cli import main
    from framework.data.dataset import DiskCache, prepare
    from framework.recipe.schema import ResizeSpec
    from framework.transforms import resize_stage

    path = tiny_recipe(tmp_path, data={"cache": "disk", "cache_dir": str(tmp_path / "cache")})
    manifest = tmp_path / "tiny.csv"
    rows = list(csv.DictReader(open(manifest, encoding="utf-8")))
    rows[0]["path"] = "/dev/zero"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and "/dev/zero" in result.output and "not regular files" in result.output
    cache = DiskCache(tmp_path / "cache", "s", 10**9)
    _, _, failures = prepare([{"path": "/dev/zero"}, {"path": str(tmp_path)}], resize_stage((32, 32), ResizeSpec()),
                             cache=cache)
    assert [why for _, why in failures] == ["not a regular file (a device, pipe or folder)"] * 2


@pytest.mark.slow
def test_an_untrusted_checkpoint_is_refused_with_what_it_is(shared_run, tmp_path):
    """A run folder whose best.pt is pickled code: every command that loads it says what it is, no traceback,
    and the code never runs."""
    import torch

    run_dir, marker = shared_run
    doctored = _clean_copy(run_dir, tmp_path / "doctored")

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": Evil()}, doctored / "checkpoints" / "best.pt")
    data = run_dir.parent.parent / "tiny.csv"
    for args in (["predict", doctored, "--csv", data, "--out", tmp_path / "p.csv"],
                 ["evaluate", doctored, "--csv", data, "--out", tmp_path / "e"],
                 ["ensemble", doctored, doctored, "--csv", data, "--out", tmp_path / "x.csv"],
                 ["explain", doctored, data, "--out", tmp_path / "x"]):
        out = _cli(*args)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "pickled Python objects" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not marker.exists()


@pytest.mark.parametrize("damage,words", [
    (lambda text: text.replace("wear", "wéar", 1).encode("latin-1"), ["line 2 is not UTF-8", "iconv"]),
    (lambda text: text.replace(".jpg", ".jpg\x00", 3).encode(), ["holds a NUL byte", "plain CSV text"]),
], ids=["latin-1", "nul-byte"])
def test_a_manifest_that_is_not_utf8_text_is_a_located_error(tmp_path, damage, words):
    from click.testing import CliRunner

    from framework.cli import main

    path = tiny_recipe(tmp_path)
    manifest = tmp_path / "tiny.csv"
    manifest.write_bytes(damage(manifest.read_text(encoding="utf-8")))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and "data.sources[0].manifest" in result.output, result.output
    assert all(w in result.output for w in words) and "Traceback" not in result.output, result.output
    from framework.errors import RunError
    from framework.inference.run import list_images

    with pytest.raises(RunError, match=words[0]):  # the same CSV given to predict / ensemble
        list_images(csv_file=manifest)


@pytest.mark.slow
def test_compare_skips_damaged_run_folders_with_a_warning_naming_them(shared_run, tmp_path):
    import shutil

    from click.testing import CliRunner

    from framework.cli import main

    run_dir, _ = shared_run
    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / "good")
    for name, file, text in [("truncated", "summary.json", '{"status": "fini'), ("a-list", "summary.json", "[1, 2]"),
                             ("bad-recipe", "recipe.resolved.yaml", "model: [unclosed"),
                             ("recipe-is-a-list", "recipe.resolved.yaml", "- a\n- b\n")]:
        shutil.copytree(run_dir, runs / name)
        (runs / name / file).write_text(text)
    (runs / "x-cv.json").write_text("{not json")
    result = CliRunner().invoke(main, ["compare", str(runs)])
    assert result.exit_code == 0, result.output
    assert "good" in result.output and "Traceback" not in result.output
    for name in ("truncated", "a-list", "bad-recipe", "recipe-is-a-list", "x-cv.json"):
        assert f"warning: left out {runs / name}" in result.output, result.output


@pytest.mark.slow
@pytest.mark.parametrize("edit,key", [(("train", "batch_size", 16), "train.batch_size"),
                                      (("model", "backbone", "resnet10t"), "model.backbone"),
                                      (("train", "optimizer", {"name": "adamw", "lr": 0.1}), "train.optimizer.lr")],
                         ids=["batch-size", "backbone", "learning-rate"])
def test_resume_refuses_an_edited_recipe_naming_the_keys(shared_run, tmp_path, edit, key):
    from click.testing import CliRunner

    from framework.cli import main

    run_dir, _ = shared_run
    section, field, value = edit
    copy = _clean_copy(run_dir, tmp_path / "edited", **{f"{section}.{field}": value})
    result = CliRunner().invoke(main, ["run", "--resume", str(copy), "--set", "train.epochs=2"])
    assert result.exit_code == 2, result.output
    assert "the recipe changed since this run's checkpoint" in result.output and key in result.output, result.output
    assert "Traceback" not in result.output
    assert (copy / "metrics.jsonl").read_text() == (run_dir / "metrics.jsonl").read_text()  # nothing trained


def test_a_run_that_failed_before_training_can_be_retried_under_its_name(tmp_path):
    """An image that exists but cannot be decoded is found when the images are decoded, after the run folder is
    made; the folder of such a run holds nothing worth keeping, so the same command again retries it."""
    import csv

    from click.testing import CliRunner

    from framework.cli import main

    path = tiny_recipe(tmp_path)
    manifest = tmp_path / "tiny.csv"
    rows = list(csv.DictReader(open(manifest, encoding="utf-8")))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8not really a jpeg")
    rows[0]["path"] = str(tmp_path / "broken.jpg")
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for _ in range(2):
        result = CliRunner().invoke(main, ["run", str(path), "--name", "again"])
        assert result.exit_code == 2 and "broken.jpg" in result.output, result.output
        assert "already exists" not in result.output


@pytest.mark.slow
def test_resume_removes_the_temporary_files_of_killed_writes(shared_run, tmp_path):
    run_dir, _ = shared_run
    copy = _clean_copy(run_dir, tmp_path / "killed")
    orphans = [copy / "checkpoints" / ".last.pt.k2j4.tmp", copy / ".summary.json.x81q.tmp"]
    for p in orphans:
        p.write_bytes(b"\0" * 1000)
    api.run(resume=copy, overrides=["train.epochs=2"], log=lambda *_: None)
    assert not any(p.exists() for p in orphans)


@pytest.mark.parametrize("free_bytes,full", [(4096, True), (50 << 30, False)], ids=["disk-full", "other-failure"])
def test_a_checkpoint_write_that_torch_fails_on_a_full_disk_says_so(tmp_path, monkeypatch, free_bytes, full):
    """torch.save on a full disk raises RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos
    704 vs 598'), measured on a 64 KB tmpfs: with no space left that is the disk-full message (the previous
    checkpoint untouched); with space left the error is not misnamed."""
    import os
    from types import SimpleNamespace

    import torch

    from framework import io as fio
    from framework.engine import checkpoint as ckpt
    from framework.errors import RunError

    ckpt.save(tmp_path / "last.pt", {"epoch": 1})

    def failing_save(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(fio.os, "statvfs", lambda p: SimpleNamespace(f_bavail=free_bytes // 4096, f_frsize=4096))
    if full:
        with pytest.raises(RunError, match="no space left on the device while writing .*last.pt; the previous"):
            ckpt.save(tmp_path / "last.pt", {"epoch": 2})
    else:
        with pytest.raises(RuntimeError, match="enforce fail"):
            ckpt.save(tmp_path / "last.pt", {"epoch": 2})
    monkeypatch.undo()
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"epoch": 1}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_ctrl_c_during_a_sweep_is_one_line_and_exit_130(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from framework.cli import main
    from framework.errors import Interrupted, Issue

    def stopped(recipe, overrides, name, log):
        raise Interrupted(Issue(f"stopped by SIGINT in epoch 1 after 2 batches; a resumable checkpoint is saved. "
                                f"Continue with `recipe run --resume runs/{name}`."))

    monkeypatch.setattr(api, "run_or_continue", stopped)
    path = tiny_recipe(tmp_path)
    result = CliRunner().invoke(main, ["sweep", str(path), "--grid", "transforms.image_size=32,40"])
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output and "stopped by SIGINT" in result.output
    assert "not started: tiny-image_size=40" in result.output


def test_a_kill_while_the_first_checkpoint_is_written_leaves_no_metrics_line_for_that_epoch(tmp_path, monkeypatch):
    """The checkpoint is written before the epoch's metrics line: a run killed in between leaves a folder whose
    metrics name no epoch without a checkpoint, and that never trained - so the same --name retries it."""
    from framework.engine import checkpoint as ckpt

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as SIGKILL would end it, mid-write

    monkeypatch.setattr(ckpt, "save_epoch", killed)
    path = tiny_recipe(tmp_path, train={"epochs": 1, "batch_size": 8, "num_workers": 0})
    with pytest.raises(Exception):
        api.run(path, name="killed", log=lambda *_: None)
    run_dir = tmp_path / "runs" / "killed"
    assert not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip()
    monkeypatch.undo()
    api.run(path, name="killed", log=lambda *_: None)  # the same name again: it trains
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
