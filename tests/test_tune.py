"""`recipe tune` (issue 32): a tiny study from the CLI (run folders, pruning, best.yaml that reproduces the best
trial), several workers on one study (journal file, SQLite, a real PostgreSQL server), Ctrl-C and a killed worker,
and bad input refused before any trial starts."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from framework.cli import main
from tests.conftest import tiny_recipe

ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
SPACE = {"train.optimizer.lr": {"float": [1.0e-4, 1.0e-1], "log": True}, "train.batch_size": {"choice": [4, 8]}}


def _recipe(tmp_path: Path, epochs: int = 3, **tune) -> Path:
    section = {"trials": 5, "metric": "val/loss", "pruner": {"name": "median", "startup_trials": 1},
               "space": SPACE} | tune
    return tiny_recipe(tmp_path, train={"epochs": epochs, "batch_size": 8, "num_workers": 0}, tune=section)


def _study(storage: str, name: str = "tiny"):
    import optuna

    if "://" not in storage:
        from optuna.storages.journal import JournalFileBackend
        storage = optuna.storages.JournalStorage(JournalFileBackend(storage))
    return optuna.load_study(study_name=name, storage=storage)


def _states(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        if not t.user_attrs.get("surplus"):
            out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def _worker(recipe: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "framework.cli", "tune", str(recipe), *args], env=ENV,
                            cwd=recipe.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _val_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["val"]["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- a tiny study
@pytest.mark.slow
def test_a_tiny_study_prunes_and_its_best_yaml_trains_the_best_trial_again(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["tune", str(recipe)])
    assert result.exit_code == 0, result.output
    runs = tmp_path / "runs"
    folders = sorted(p.name for p in runs.glob("tiny-t[0-9]*"))
    assert folders == [f"tiny-t{i:03d}" for i in range(5)]
    summaries = {f: json.loads((runs / f / "summary.json").read_text()) for f in folders}
    pruned = [s for s in summaries.values() if s["status"] == "pruned"]
    assert pruned, "the median pruner with one startup trial stopped no trial"
    for s in pruned:
        assert s["pruned"]["epoch"] < 3 and "median" in s["pruned"]["why"]
        assert s["epochs_done"] == s["pruned"]["epoch"]
    assert "pruned at epoch" in result.output and "best parameters:" in result.output
    assert "resolves differently" not in result.output  # best.yaml is the best trial's recipe, key for key
    study = _study(str(runs / "tiny-tune" / "study.journal"))
    assert sum(_states(study).values()) == 5 and _states(study).get("PRUNED") == len(pruned)
    rows = (runs / "tiny-tune" / "trials.csv").read_text().splitlines()
    assert len(rows) == 6 and rows[0].startswith("trial,state,val/loss,train.optimizer.lr,train.batch_size")

    best = study.best_trial
    best_yaml = runs / "tiny-tune" / "best.yaml"
    written = yaml.safe_load(best_yaml.read_text())
    assert written["train"]["optimizer"]["lr"] == best.params["train.optimizer.lr"]
    again = CliRunner().invoke(main, ["run", str(best_yaml), "--name", "again"])
    assert again.exit_code == 0, again.output
    assert _val_losses(runs / "again") == _val_losses(Path(best.user_attrs["run_dir"]))
    assert json.loads((runs / "again" / "summary.json").read_text())["best_value"] == best.value

    from framework.tune.report import _differs

    assert _differs(best_yaml, best.user_attrs["run_dir"]) == []
    edited = tmp_path / "edited.yaml"
    edited.write_text(best_yaml.read_text().replace(f"lr: {written['train']['optimizer']['lr']}", "lr: 0.5"))
    (runs / "tiny-tune" / "edited.yaml").write_text(edited.read_text())
    assert _differs(runs / "tiny-tune" / "edited.yaml", best.user_attrs["run_dir"]) == ["train.optimizer.lr"]

    report = CliRunner().invoke(main, ["tune", str(recipe), "--report"])  # runs no trial
    assert report.exit_code == 0 and "best: trial" in report.output
    assert sorted(p.name for p in runs.glob("tiny-t[0-9]*")) == folders


# ------------------------------------------------------------------------------------- several workers
def _two_workers(recipe: Path, storage: str, trials: int = 4) -> None:
    workers = [_worker(recipe, "--trials", str(trials), "--storage", storage) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for w, out in zip(workers, outputs):
        assert w.returncode == 0, out[-3000:]
    study = _study(storage)
    counted = [t for t in study.get_trials() if not t.user_attrs.get("surplus")]
    assert len(counted) == trials and {t.state.name for t in counted} <= {"COMPLETE", "PRUNED"}
    numbers = [t.number for t in study.get_trials()]
    assert len(numbers) == len(set(numbers))
    folders = [t.user_attrs["run_dir"] for t in counted]
    assert len(set(folders)) == trials and all(Path(f, "summary.json").is_file() for f in folders)
    assert all(any(f"trial {t.number}:" in out for out in outputs) for t in counted)  # each ran in one worker


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_two_workers_share_one_study(tmp_path, kind):
    recipe = _recipe(tmp_path, epochs=2)
    storage = str(tmp_path / "s.journal") if kind == "journal" else f"sqlite:///{tmp_path / 's.db'}"
    _two_workers(recipe, storage)


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (initdb + pg_ctl in a temporary folder the server's user can
    reach), stopped and removed at the end."""
    import tempfile

    initdb = shutil.which("initdb")
    if not initdb:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL (initdb, pg_ctl) is not installed: .ci/run installs it")
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed on this machine")
    import importlib.util

    if importlib.util.find_spec("psycopg") is None:
        if os.environ.get("CI"):
            pytest.fail("the PostgreSQL driver is missing: .ci/run installs it with .[dev]")
        pytest.skip('the PostgreSQL driver is not installed: pip install -e ".[tune]"')
    pg_ctl = shutil.which("pg_ctl") or str(Path(initdb).resolve().with_name("pg_ctl"))
    folder = Path(tempfile.mkdtemp(prefix="recipe-pg-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    if as_user:
        shutil.chown(folder, "postgres")
    port = str(15432 + os.getpid() % 1000)
    try:
        subprocess.run(as_user + [initdb, "-D", str(folder / "data"), "-U", "postgres", "--auth=trust"],
                       check=True, capture_output=True)
        subprocess.run(as_user + [pg_ctl, "-D", str(folder / "data"), "-l", str(folder / "log"), "-w", "-o",
                                  f"-h 127.0.0.1 -p {port} -k {folder}", "start"], check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", str(folder / "data"), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_one_study_in_postgresql(tmp_path, postgres):
    _two_workers(_recipe(tmp_path, epochs=2), postgres)


# ------------------------------------------------------------------------------------- stops and kills
def _wait_for(predicate, proc: subprocess.Popen, seconds: float = 300) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError("the worker ended first:\n" + proc.stdout.read()[-3000:])
        time.sleep(0.2)
    raise AssertionError("timed out")


def _has_epoch(run_dir: Path) -> bool:
    return (run_dir / "metrics.jsonl").is_file() and bool((run_dir / "metrics.jsonl").read_text().strip())


@pytest.mark.slow
def test_ctrl_c_then_the_same_command_continues_the_study(tmp_path):
    recipe = _recipe(tmp_path, epochs=12, trials=3, pruner={"name": "none"})
    runs = tmp_path / "runs"
    worker = _worker(recipe)
    _wait_for(lambda: _has_epoch(runs / "tiny-t001"), worker)
    worker.send_signal(signal.SIGINT)
    out = worker.communicate(timeout=300)[0]
    assert worker.returncode == 130, out[-3000:]
    assert "run the same `recipe tune` command again" in out and "Traceback" not in out
    first = (runs / "tiny-t000" / "summary.json").read_text()
    study = _study(str(runs / "tiny-tune" / "study.journal"))
    assert _states(study) == {"COMPLETE": 1, "FAIL": 1, "WAITING": 1}

    again = _worker(recipe)
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out[-3000:]
    assert (runs / "tiny-t000" / "summary.json").read_text() == first  # a finished trial is not redone
    resumed = json.loads((runs / "tiny-t001" / "summary.json").read_text())
    assert resumed["status"] == "finished" and resumed["resumed_at_epoch"] >= 1
    study = _study(str(runs / "tiny-tune" / "study.journal"))
    assert _states(study) == {"COMPLETE": 3, "FAIL": 1}
    retry = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == 1]
    assert len(retry) == 1 and retry[0].user_attrs["run_dir"] == str(runs / "tiny-t001")
    assert not (runs / f"tiny-t{retry[0].number:03d}").exists()  # resumed in place, no second folder


@pytest.mark.slow
def test_a_killed_workers_trial_is_not_left_running(tmp_path):
    recipe = _recipe(tmp_path, epochs=12, trials=2, pruner={"name": "none"}, stale_after=3)
    runs = tmp_path / "runs"
    worker = _worker(recipe)
    _wait_for(lambda: _has_epoch(runs / "tiny-t000"), worker)
    worker.kill()
    worker.wait()
    study = _study(str(runs / "tiny-tune" / "study.journal"))
    assert _states(study) == {"RUNNING": 1}
    time.sleep(3.5)  # no heartbeat for longer than tune.stale_after

    again = _worker(recipe)
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out[-3000:]
    assert "trial 0 sent no heartbeat" in out
    study = _study(str(runs / "tiny-tune" / "study.journal"))
    assert _states(study) == {"COMPLETE": 2, "FAIL": 1}
    resumed = json.loads((runs / "tiny-t000" / "summary.json").read_text())
    assert resumed["status"] == "finished" and resumed["resumed_at_epoch"] >= 1  # the retry continued its folder


# ------------------------------------------------------------------------------------------- bad input
BAD = {
    "unknown path": ({"space": {"train.optimizer.lrr": {"float": [0.001, 0.01]}}}, "Did you mean 'lr'?"),
    "inverted range": ({"space": {"train.optimizer.lr": {"float": [0.01, 0.001]}}}, "empty or inverted"),
    "empty int range": ({"space": {"train.batch_size": {"int": [8, 8]}}}, "empty or inverted"),
    "log of zero": ({"space": {"train.optimizer.lr": {"float": [0.0, 0.01], "log": True}}}, "log: true needs"),
    "choice that fails": ({"space": {"model.backbone": {"choice": ["test_resnet", "resnet_nope"]}}},
                          "resnet_nope does not make a valid recipe"),
    "range end that fails": ({"space": {"train.optimizer.lr": {"float": [-1.0, 0.01]}}}, "-1.0 does not make"),
    "unknown metric": ({"metric": "val/macro_f11", "space": SPACE}, "Did you mean 'val/macro_f1'"),
    "a section a trial may not change": ({"space": {"output.root": {"choice": ["a", "b"]}}}, "cannot be searched"),
    "grid over a continuous range": ({"sampler": {"name": "grid"}, "space": SPACE}, "give the range a step"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tune_sections_are_located_errors_before_any_trial(tmp_path, case):
    tune, expected = BAD[case]
    recipe = tiny_recipe(tmp_path, tune=tune)
    for command in (["validate", str(recipe)], ["tune", str(recipe)]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2, result.output
        assert expected in result.output and "Fix:" in result.output and "Traceback" not in result.output
        assert f"{recipe}:" in result.output  # the file (and line) of the section
        assert not (tmp_path / "runs").exists()


def test_an_unreachable_storage_and_a_missing_section_are_errors(tmp_path):
    recipe = tiny_recipe(tmp_path, tune={"space": SPACE})
    result = CliRunner().invoke(main, ["tune", str(recipe), "--storage", "postgresql://nobody@127.0.0.1:1/none"])
    assert result.exit_code == 2 and "--storage" in result.output and "Fix:" in result.output, result.output
    assert not any((tmp_path / "runs").glob("tiny-t[0-9]*"))
    plain = tiny_recipe(tmp_path)
    result = CliRunner().invoke(main, ["tune", str(plain)])
    assert result.exit_code == 2 and "no `tune` section" in result.output


def test_a_study_of_the_same_name_that_searches_something_else_is_refused(tmp_path):
    recipe = tiny_recipe(tmp_path, tune={"space": SPACE, "trials": 1})
    storage = str(tmp_path / "s.journal")
    ok = CliRunner().invoke(main, ["tune", str(recipe), "--storage", storage, "--report"])
    assert ok.exit_code == 0, ok.output
    other = CliRunner().invoke(main, ["tune", str(recipe), "--storage", storage, "--report",
                                      "--set", "train.optimizer.weight_decay=0.1"])
    assert other.exit_code == 2 and "already searches something else" in other.output and "--study" in other.output
    worker_own = CliRunner().invoke(main, ["tune", str(recipe), "--storage", storage, "--report",
                                           "--set", "tune.trials=3"])  # a worker's own budget is not the search
    assert worker_own.exit_code == 0, worker_own.output


def test_values_are_written_as_yaml_and_a_grid_lists_every_value(tmp_path):
    from framework.recipe.loaded import load_recipe
    from framework.tune import space as sp

    assert sp.as_yaml(0.1) == "0.1" and sp.as_yaml("yes") == "'yes'" and sp.as_yaml([96, 128]) == "[96, 128]"
    assert sp.grid(load_recipe(tiny_recipe(tmp_path, tune={"space": {
        "train.loss.label_smoothing": {"float": [0.0, 0.2], "step": 0.05}, "train.batch_size": {"choice": [4, 8]}}}))
        .recipe.tune.space) == {"train.loss.label_smoothing": [0.0, 0.05, 0.1, 0.15, 0.2], "train.batch_size": [4, 8]}
