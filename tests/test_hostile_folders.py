"""The hostile corpus: run folders, export folders and input files damaged, edited, of the wrong type, inconsistent
with each other, pointing outside, or not regular files. Every case must end with exit code 2 and a message that
names the file, without a traceback, without hanging, and without leaving a new folder behind.

Each row is (case, what it breaks, the command that reads it, the file the message must name). Add a row for every
new file a folder gets or every new way one was found to break."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from framework import api
from framework.cli import main
from tests.conftest import tiny_recipe

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # the module trains and exports one tiny run


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A finished tiny run (Grad-CAM images chosen, a decision rule fitted) and its ONNX export."""
    from framework.inference.decision import fit_runs

    tmp = tmp_path_factory.mktemp("pristine")
    path = tiny_recipe(tmp, train={"epochs": 1, "batch_size": 8, "num_workers": 0},
                       logging={"sample_grid": 0, "progress": False, "cam_every": 1, "cam_images": 2})
    run = api.run(path, name="run", log=lambda *_: None)
    fit_runs([run])
    export = api.export(run, out=tmp / "export", log=lambda *_: None)["out"]
    images = tmp / "images"
    images.mkdir()
    for r in json.loads((run / "cam_images.json").read_text())["paths"][:2] or [_first_val(run)]:
        shutil.copy(r, images / Path(r).name)
    return {"run": run, "export": export, "images": images, "recipe": path}


def _first_val(run: Path) -> str:
    import csv

    with open(run / "split.csv", newline="") as f:
        return next(r["path"] for r in csv.DictReader(f) if r["split"] == "val")


# ------------------------------------------------------------------------------------------ how files are broken
def _json_edit(name, edit):
    def apply(folder: Path):
        data = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps(edit(data)))
    return apply


def _write(name, text):
    return lambda folder: (folder / name).write_text(text)


def _delete(name):
    return lambda folder: (folder / name).unlink()


def _fifo(name):
    def apply(folder: Path):
        (folder / name).unlink()
        os.mkfifo(folder / name)
    return apply


def _checkpoint_edit(edit):
    def apply(folder: Path):
        for name in ("best.pt", "last.pt"):
            p = folder / "checkpoints" / name
            state = torch.load(p, weights_only=True)
            edit(state["model"])
            torch.save(state, p)
    return apply


def _nan(model: dict) -> None:
    for v in model.values():
        if v.is_floating_point():
            v.fill_(float("nan"))


def _wrong_shapes(model: dict) -> None:
    for k, v in list(model.items()):
        if v.is_floating_point() and v.dim() >= 1:
            model[k] = torch.zeros(*(s + 1 for s in v.shape))


def _split_path(folder: Path) -> None:
    lines = (folder / "split.csv").read_text().splitlines()
    i = next(i for i, ln in enumerate(lines) if ",val," in ln)
    lines[i] = "/etc/passwd" + lines[i][lines[i].index(","):]
    (folder / "split.csv").write_text("\n".join(lines) + "\n")


def _labels(classes):
    return _json_edit("labels.json", lambda d: {"label": {**d["label"], "classes": classes}})


def _recipe_edit(edit):
    def apply(folder: Path):
        recipe = yaml.safe_load((folder / "recipe.resolved.yaml").read_text())
        edit(recipe)
        (folder / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return apply


def _offsets(value):
    return _json_edit("decision.json", lambda d: {**d, "questions": {
        q: {**e, "offsets": {c: value for c in e["offsets"]}} for q, e in d["questions"].items()}})


RESUME = ["run", "--resume", "{run}", "--set", "train.epochs=2"]
EVALUATE = ["evaluate", "{run}"]
PREDICT = ["predict", "{run}", "--images", "{images}", "--out", "{tmp}/p.csv"]
EXPORT = ["export", "{run}", "--out", "{tmp}/new-export"]
PREDICT_EXPORT = ["predict", "{export}", "--images", "{images}", "--out", "{tmp}/p.csv"]

RUN_CASES = [
    ("summary deleted", _delete("summary.json"), RESUME, "summary.json"),
    ("summary a list", _write("summary.json", "[1, 2]"), RESUME, "summary.json"),
    ("summary status wrong type", _json_edit("summary.json", lambda d: {**d, "status": 3}), RESUME, "summary.json"),
    ("split deleted", _delete("split.csv"), EVALUATE, "split.csv"),
    ("split names /etc/passwd", _split_path, EVALUATE, "split.csv"),
    ("split side unknown", lambda f: (f / "split.csv").write_text((f / "split.csv").read_text().replace(",val,", ",x,", 1)),
     EVALUATE, "split.csv"),
    ("labels a list", _write("labels.json", '["wear", "incorrect", "not_wear"]'), EVALUATE, "labels.json"),
    ("labels 2 of 3 classes", _labels(["wear", "incorrect"]), EVALUATE, "labels.json"),
    ("labels permuted", _labels(["not_wear", "wear", "incorrect"]), EVALUATE, "labels.json"),
    ("labels permuted (export)", _labels(["not_wear", "wear", "incorrect"]), EXPORT, "labels.json"),
    ("decision offsets strings", _offsets("high"), PREDICT, "decision.json"),
    ("decision offsets NaN", _offsets(float("nan")), EVALUATE, "decision.json"),
    ("decision not JSON", _write("decision.json", "{offsets"), PREDICT, "decision.json"),
    ("calibration a list", _write("calibration.json", "[]"), EXPORT, "calibration.json"),
    ("cam images not JSON", _write("cam_images.json", "not json"), RESUME, "cam_images.json"),
    ("cam images a list", _write("cam_images.json", "[1]"), RESUME, "cam_images.json"),
    ("cam images /etc/passwd", _json_edit("cam_images.json", lambda d: {"paths": ["/etc/passwd"], "boxes": [None]}),
     RESUME, "cam_images.json"),
    ("checkpoint NaN weights", _checkpoint_edit(_nan), EVALUATE, "best.pt"),
    ("checkpoint NaN weights (export)", _checkpoint_edit(_nan), EXPORT, "best.pt"),
    ("checkpoint wrong shapes", _checkpoint_edit(_wrong_shapes), EVALUATE, "best.pt"),
    ("checkpoint wrong shapes (resume)", _checkpoint_edit(_wrong_shapes), RESUME, "checkpoint"),
    ("metrics garbage", _write("metrics.jsonl", "garbage\n{}\n"), RESUME, "metrics.jsonl"),
    ("recipe image size edited", _recipe_edit(lambda r: r["transforms"].update(image_size=[48, 48])), PREDICT,
     "recipe.resolved.yaml"),
    ("recipe resize edited", _recipe_edit(lambda r: r["transforms"]["resize"].update(mode="stretch")), EVALUATE,
     "recipe.resolved.yaml"),
    ("recipe NUL byte", lambda f: (f / "recipe.resolved.yaml").write_bytes(b"data:\x00\n"), EVALUATE,
     "recipe.resolved.yaml"),
]


def _export_info(edit):
    return _json_edit("export.json", edit)


def _link_out(folder: Path) -> None:
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").symlink_to("/etc/passwd")


EXPORT_CASES = [
    ("export.json not JSON", _write("export.json", "{"), "export.json"),
    ("export.json a list", _write("export.json", "[]"), "export.json"),
    ("file ../other/model.onnx", _export_info(lambda d: {**d, "file": "../other/model.onnx"}), "export.json"),
    ("file /etc/passwd", _export_info(lambda d: {**d, "file": "/etc/passwd"}), "export.json"),
    ("model file links out", _link_out, "model.onnx"),
    ("size not numbers", _export_info(lambda d: {**d, "input": {**d["input"], "size": ["a", "b"]}}), "export.json"),
    ("size of another model", _export_info(lambda d: {**d, "input": {**d["input"], "size": [64, 64]}}), "export.json"),
    ("2 class names for 3 outputs", _export_info(lambda d: {**d, "labels": {"label": {
        "classes": ["wear", "not_wear"], "parts": None, "formula": None}}}), "export.json"),
    ("check figure NaN", _export_info(lambda d: {**d, "check": {**d["check"], "max_abs_difference": float("nan")}}),
     "export.json"),
    ("outputs wrong type", _export_info(lambda d: {**d, "outputs": "label.probs"}), "export.json"),
    ("decision offsets strings", _offsets("x"), "decision.json"),
]


def _invoke(args: list[str], where: dict) -> tuple[int, str]:
    result = CliRunner().invoke(main, [a.format(**where) for a in args])
    return result.exit_code, result.output + (repr(result.exception) if result.exit_code not in (0, 2) else "")


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _check_damaged(pristine, tmp_path, kind: str, damage, command: list[str], names: str) -> None:
    """Copy the pristine `kind` folder, damage it, run the command: exit 2, the file named with a fix, no traceback,
    nothing new left in the folder's parent."""
    copy = shutil.copytree(pristine[kind], tmp_path / kind, symlinks=True)
    damage(copy)
    before = _listing(tmp_path)
    code, output = _invoke(command, {**pristine, kind: copy, "tmp": tmp_path})
    assert code == 2, output
    assert names in output and "Fix:" in output and "Traceback" not in output, output
    assert _listing(tmp_path) == before, "a new file or folder was left behind"


@pytest.mark.parametrize("case, damage, command, names", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_a_damaged_run_folder_is_a_located_error(pristine, tmp_path, case, damage, command, names):
    _check_damaged(pristine, tmp_path, "run", damage, command, names)


@pytest.mark.parametrize("case, damage, names", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_a_damaged_export_folder_is_a_located_error(pristine, tmp_path, case, damage, names):
    _check_damaged(pristine, tmp_path, "export", damage, PREDICT_EXPORT, names)


def test_the_pristine_folders_work(pristine, tmp_path):
    """The corpus breaks working folders: each command above succeeds on the untouched copies."""
    for command in (EVALUATE, PREDICT, EXPORT, PREDICT_EXPORT):
        code, output = _invoke(command, {**pristine, "tmp": tmp_path})
        assert code == 0, output


def test_compare_leaves_a_damaged_run_out_and_says_why(pristine, tmp_path):
    runs = tmp_path / "runs"
    good = shutil.copytree(pristine["run"], runs / "good")
    bad = shutil.copytree(pristine["run"], runs / "bad")
    (bad / "metrics.jsonl").write_text('{"epoch": "one"}\n')
    result = CliRunner().invoke(main, ["compare", str(runs), "--format", "csv"])  # (output: stdout and stderr)
    assert result.exit_code == 0, result.output
    assert "left out" in result.output and "metrics.jsonl" in result.output
    rows = [ln.split(",")[0] for ln in result.output.splitlines() if ln.startswith(("good", "bad"))]
    assert rows == [good.name]


# ------------------------------------------------------------------------- files that are not files (subprocess)
def _cli(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    """In its own process with a time limit: a FIFO that is opened and read would hang forever."""
    return subprocess.run([sys.executable, "-m", "framework.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env={**os.environ, **(env or {})})


def test_a_metrics_fifo_does_not_hang_compare(pristine, tmp_path):
    run = shutil.copytree(pristine["run"], tmp_path / "runs" / "fifo")
    _fifo("metrics.jsonl")(run)
    out = _cli("compare", tmp_path / "runs")
    assert out.returncode == 0 and "not a regular file" in out.stderr and "metrics.jsonl" in out.stderr, out.stderr


@pytest.mark.parametrize("what", ["recipe", "extends", "train_file", "recipe /dev/zero", "train_file /dev/zero"])
def test_a_recipe_input_that_is_not_a_regular_file_is_refused(pristine, tmp_path, what):
    recipe = yaml.safe_load(pristine["recipe"].read_text())
    target = tmp_path / "recipe.yaml"
    if what.startswith("recipe"):
        target = Path("/dev/zero") if "zero" in what else tmp_path / "fifo.yaml"
        if "zero" not in what:
            os.mkfifo(target)
    elif what == "extends":
        os.mkfifo(tmp_path / "base.yaml")
        target.write_text(yaml.safe_dump({"extends": "base.yaml", **recipe}))
    else:
        src = "/dev/zero" if "zero" in what else tmp_path / "aug.yaml"
        if "zero" not in what:
            os.mkfifo(src)
        recipe["transforms"] = {**recipe["transforms"], "train": [], "train_file": str(src)}
        target.write_text(yaml.safe_dump(recipe))
    out = _cli("validate", target)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "not a regular file" in out.stderr, out.stderr


# ------------------------------------------------------------------------------ recipes that validate must run
def _recipe_with(pristine, tmp_path, edit) -> Path:
    recipe = yaml.safe_load(pristine["recipe"].read_text())
    recipe["output"] = {"root": str(tmp_path / "runs")}
    edit(recipe)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _ro_root(recipe):
    recipe["output"]["root"] = "/proc/recipe-runs"


RECIPE_CASES = [
    ("seed 2**70", lambda r: r["train"].update(seed=2**70), "train.seed"),
    ("Lambda with a string", lambda r: r["transforms"].update(train=[{"name": "Lambda", "image": "x"}]),
     "transforms.train[0].name"),
    ("timm checkpoint_path", lambda r: r["model"].update(args={"checkpoint_path": "/etc/passwd"}),
     "model.args.checkpoint_path"),
    ("cache_dir /dev/null", lambda r: r["data"].update(cache="disk", cache_dir="/dev/null"), "data.cache_dir"),
    ("output.root under /proc", _ro_root, "output.root"),
]


@pytest.mark.parametrize("case, edit, field", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_what_would_crash_run_fails_validate(pristine, tmp_path, case, edit, field):
    path = _recipe_with(pristine, tmp_path, edit)
    for command in ("validate", "run"):
        result = CliRunner().invoke(main, [command, str(path)])
        assert result.exit_code == 2, result.output + repr(result.exception)
        assert field in result.output and "r.yaml" in result.output, result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_raw_nul_byte_in_a_recipe_names_its_line(tmp_path):
    path = tmp_path / "nul.yaml"
    path.write_bytes(b"data:\n  root: x\x00\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and "nul.yaml:2" in result.output, result.output + repr(result.exception)


def test_a_fast_dev_run_value_int_cannot_read(pristine, tmp_path):
    result = CliRunner().invoke(main, ["validate", str(pristine["recipe"])], env={"RECIPE_FAST_DEV_RUN": "²"})
    assert result.exit_code == 2 and "RECIPE_FAST_DEV_RUN" in result.output, result.output + repr(result.exception)


def test_export_to_an_unwritable_place(pristine):
    result = CliRunner().invoke(main, ["export", str(pristine["run"]), "--out", "/proc/recipe-export"])
    assert result.exit_code == 2 and "--out" in result.output, result.output + repr(result.exception)


def test_weights_that_fill_no_tensor_are_refused(pristine, tmp_path):
    state = torch.load(pristine["run"] / "checkpoints" / "best.pt", weights_only=True)["model"]
    torch.save({k: torch.zeros(*(s + 1 for s in v.shape)) for k, v in state.items() if v.dim()}, tmp_path / "w.pth")
    path = _recipe_with(pristine, tmp_path, lambda r: r["model"].update(weights=str(tmp_path / "w.pth")))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and "model.weights" in result.output, result.output + repr(result.exception)


def test_one_image_listed_twice_through_a_hard_link_is_refused(pristine, tmp_path):
    import csv

    rows = list(csv.DictReader(open(Path(pristine["recipe"]).parent / "tiny.csv", newline="")))
    os.link(rows[0]["path"], tmp_path / "same.jpg")
    rows.append({**rows[0], "path": str(tmp_path / "same.jpg"), "group": "someone-else"})
    with open(tmp_path / "tiny.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    path = _recipe_with(pristine, tmp_path, lambda r: r["data"].update(root=str(tmp_path)))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and "listed twice" in result.output and "same.jpg" in result.output, result.output


def test_a_huge_sparse_image_is_not_hashed(pristine, tmp_path):
    """A 10 GB sparse file listed as an image with the disk cache: refused by its size, never read whole."""
    import csv
    import time

    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:
        f.truncate(10 << 30)
    rows = list(csv.DictReader(open(Path(pristine["recipe"]).parent / "tiny.csv", newline="")))
    rows.append({**rows[0], "path": str(big), "group": "big"})
    with open(tmp_path / "tiny.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    path = _recipe_with(pristine, tmp_path, lambda r: r["data"].update(root=str(tmp_path), cache="disk",
                                                                       cache_dir=str(tmp_path / "cache")))
    started = time.perf_counter()
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2 and "big.jpg" in result.output and "over the" in result.output, result.output
    assert time.perf_counter() - started < 60  # hashing 10 GB would take minutes


def test_a_missing_image_is_named_before_the_class_balance(pristine, tmp_path):
    """The only image of a class is missing and sits in validation: the missing file is the error, not 'the class
    has no training image' (which counts the missing file as a validation image)."""
    import csv

    rows = [r for r in csv.DictReader(open(Path(pristine["recipe"]).parent / "tiny.csv", newline=""))
            if r["mask_state"] != "incorrect"]
    rows.append({**rows[0], "path": str(tmp_path / "gone.jpg"), "mask_state": "incorrect", "group": "gone"})
    with open(tmp_path / "tiny.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    groups = sorted({r["group"] for r in rows})
    val = set(groups[::4]) | {"gone"}  # whole groups on one side
    with open(tmp_path / "split.csv", "w", newline="") as f:
        f.write("path,split\n" + "".join(f"{r['path']},{'val' if r['group'] in val else 'train'}\n" for r in rows))
    path = _recipe_with(pristine, tmp_path, lambda r: r["data"].update(root=str(tmp_path)) or
                        r.update(validation={"type": "file", "path": str(tmp_path / "split.csv")}))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and "gone.jpg" in result.output and "do not exist" in result.output, result.output


def test_a_prior_shift_needs_the_run_folder_not_its_export(pristine, tmp_path):
    result = CliRunner().invoke(main, ["predict", str(pristine["export"]), "--images", str(pristine["images"]),
                                       "--prior-shift", "em", "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 2 and "is an exported model" in result.output, result.output
    assert not (tmp_path / "p.csv").exists()
