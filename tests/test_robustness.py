"""Several processes, crash safety (signals, SIGKILL, full disk) and fuzzed recipes."""
import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framework import api
from framework.cli import main
from framework.engine import signals
from framework.errors import Interrupted
from tests.conftest import REPO, tiny_recipe

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_cpu_processes_shard_the_data_and_match_one_process_evaluation(tmp_path):
    from framework.inference import predict as P, run as R
    from framework.engine.metrics import summarize

    path = tiny_recipe(tmp_path, validation={"type": "holdout", "ratio": 1 / 3},
                       train={"epochs": 2, "batch_size": 4, "num_workers": 0})
    env = {**ENV, "RECIPE_SHARD_LOG": str(tmp_path / "shards")}
    out = subprocess.run([sys.executable, "-m", "framework.cli", "run", str(path), "--processes", "2",
                          "--name", "ddp"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("done:") == 1  # one process prints
    run_dir = tmp_path / "runs" / "ddp"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]
    assert len(list((run_dir / "tb").iterdir())) == 1  # one event file: only the main process writes
    assert json.loads((run_dir / "summary.json").read_text())["processes"] == 2
    seen = {}
    for rank in (0, 1):
        for line in (tmp_path / "shards" / f"rank{rank}.txt").read_text().splitlines():
            epoch, *idx = map(int, line.split())
            seen.setdefault((epoch, rank), []).extend(idx)
    for epoch in (1, 2):
        a, b = seen[(epoch, 0)], seen[(epoch, 1)]
        assert not set(a) & set(b) and sorted(a + b) == list(range(24))  # 24 training images, split in two
    # validation metrics gathered from 2 processes == one process evaluating the same checkpoint
    run = R.load_run(run_dir, checkpoint="last")
    with open(run_dir / "split.csv", newline="", encoding="utf-8") as f:
        val = [r for r in csv.DictReader(f) if r["split"] == "val"]
    pred = P.predict_tasks(run, [r["path"] for r in val])
    probs, ok = pred.probs, pred.ok
    classes = run.labels["label"].classes
    y_true = np.array([[classes.index(r["label"])] for r in val])
    single = summarize(y_true, probs["label"].argmax(1)[:, None], {"label": run.labels["label"]})
    logged = _metrics(run_dir)[-1]["val"]
    assert logged["confusion"] == single["confusion"] and logged["macro_f1"] == pytest.approx(single["macro_f1"])
    assert sum(map(sum, logged["confusion"])) == len(val) == 12  # each sample exactly once


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_one_run_like_two_processes_on_one_node(tmp_path):
    """Two torchrun launches with --nnodes 2 (node ranks 0 and 1, one process each, rendezvous on 127.0.0.1, gloo)
    make one run folder, validate every image once, and give exactly the metrics of --processes 2 on one node."""
    path = tiny_recipe(tmp_path, validation={"type": "holdout", "ratio": 1 / 3},
                       train={"epochs": 2, "batch_size": 4, "num_workers": 0})
    one = subprocess.run([sys.executable, "-m", "framework.cli", "run", str(path), "--processes", "2",
                          "--name", "one-node"], env=ENV, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                               "--master_addr", "127.0.0.1", "--master_port", str(port), "--nproc_per_node", "1",
                               "-m", "framework.cli", "run", str(path), "--name", "two-nodes"],
                              env={**ENV, "RECIPE_SHARD_LOG": str(tmp_path / "shards")}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [n.communicate(timeout=600) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert sum(o[0].count("done:") for o in outs) == 1  # the main process of node 0 reports
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["one-node", "two-nodes"]
    run_dir = tmp_path / "runs" / "two-nodes"
    assert json.loads((run_dir / "summary.json").read_text())["processes"] == 2
    for epoch in ("1", "2"):
        a, b = ([int(i) for line in (tmp_path / "shards" / f"rank{r}.txt").read_text().splitlines()
                 if line.split()[0] == epoch for i in line.split()[1:]] for r in (0, 1))
        assert not set(a) & set(b) and sorted(a + b) == list(range(24))
    two, single = _metrics(run_dir), _metrics(tmp_path / "runs" / "one-node")
    assert sum(map(sum, two[-1]["val"]["confusion"])) == 12  # every validation image once
    for a, b in zip(two, single):
        for side in ("train", "val"):
            assert a[side]["confusion"] == b[side]["confusion"]
            assert a[side]["loss"] == pytest.approx(b[side]["loss"], abs=1e-6)


@pytest.mark.slow
def test_interrupt_mid_epoch_saves_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch):
    path = tiny_recipe(tmp_path, train={"epochs": 2, "batch_size": 4, "num_workers": 0})
    straight = api.run(path, name="straight", log=lambda *_: None)
    calls = {"n": 0}
    real = signals.StopSignal.should_stop

    def signal_in_epoch_2(self, acc):  # epoch 1 has 7 batches (27 images / 4): step 10 is epoch 2, batch 3
        calls["n"] += 1
        if calls["n"] == 10:
            self.received = "SIGINT"
        return real(self, acc)

    monkeypatch.setattr(signals.StopSignal, "should_stop", signal_in_epoch_2)
    with pytest.raises(Interrupted) as e:
        api.run(path, name="cut", log=lambda *_: None)
    assert "stopped by SIGINT in epoch 2 after 3 batches" in str(e.value) and "--resume" in str(e.value)
    run_dir = tmp_path / "runs" / "cut"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["partial"]["batches"] == 3
    monkeypatch.setattr(signals.StopSignal, "should_stop", real)
    api.run(resume=run_dir, log=lambda *_: None)
    a, b = _metrics(straight)[-1], _metrics(run_dir)[-1]
    assert b["epoch"] == 2 and len(_metrics(run_dir)) == 2
    for side in ("train", "val"):
        for k in ("loss", "accuracy", "macro_f1"):
            assert b[side][k] == pytest.approx(a[side][k], abs=1e-6), (side, k)


@pytest.mark.slow
def test_real_sigint_stops_cleanly_and_resumes(tmp_path):
    path = tiny_recipe(tmp_path, transforms={"image_size": 64}, train={"epochs": 4, "batch_size": 2, "num_workers": 0})
    proc = subprocess.Popen([sys.executable, "-m", "framework.cli", "run", str(path), "--name", "sig"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "runs" / "sig" / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert last.exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped by SIGINT" in err and "recipe run --resume" in err and "Traceback" not in err
    result = CliRunner().invoke(main, ["run", "--resume", str(tmp_path / "runs" / "sig")])
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in _metrics(tmp_path / "runs" / "sig")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_finishes_with_a_loadable_best(tmp_path):
    # eight epochs: the kill lands well before the end even on a fast machine (three could all finish before it)
    path = tiny_recipe(tmp_path, transforms={"image_size": 64}, train={"epochs": 8, "batch_size": 2, "num_workers": 0})
    proc = subprocess.Popen([sys.executable, "-m", "framework.cli", "run", str(path), "--name", "kill"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "runs" / "kill" / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 2
    proc.kill()
    proc.wait()
    state = torch.load(last, weights_only=True)
    assert 1 <= state["epoch"] < 8 and "partial" not in state
    api.run(resume=tmp_path / "runs" / "kill", log=lambda *_: None)
    assert [r["epoch"] for r in _metrics(tmp_path / "runs" / "kill")] == list(range(1, 9))
    best = torch.load(tmp_path / "runs" / "kill" / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] >= 1 and "model" in best


def test_full_disk_gives_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from framework import io as ckpt  # where every atomic write goes through

    path = tiny_recipe(tmp_path, train={"epochs": 3, "batch_size": 8, "num_workers": 0})
    real = ckpt.os.fsync
    saves = {"n": 0}

    def full_after_two_checkpoints(fd):
        if os.fstat(fd).st_size > 100_000:  # checkpoints, not the small json files
            saves["n"] += 1
            if saves["n"] > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(ckpt.os, "fsync", full_after_two_checkpoints)
    result = CliRunner().invoke(main, ["run", str(path), "--name", "full"])
    assert result.exit_code == 2 and "no space left on the device" in result.output and "--resume" in result.output
    checkpoints = tmp_path / "runs" / "full" / "checkpoints"
    assert not [p for p in checkpoints.iterdir() if p.name.endswith(".tmp")]  # no half-written files
    assert torch.load(checkpoints / "last.pt", weights_only=True)["epoch"] == 1


def test_broken_metrics_line_from_a_crash_is_dropped_on_resume(tmp_path):
    from framework.folders import RunFolder

    record = '{"epoch": %d, "train": {"macro_f1": 0.5}}'
    p = tmp_path / "metrics.jsonl"
    p.write_text(record % 1 + "\n" + record % 2 + '\n{"epo')
    RunFolder(tmp_path).trim_metrics(2)
    assert p.read_text() == record % 1 + "\n"


def test_manifest_duplicates_and_paths_outside_the_root(tmp_path, data_root):
    img = data_root / "utkface_subset" / "images"
    first = sorted(img.iterdir())[0].name
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes((img / first).read_bytes())
    base = {"data": {"root": str(tmp_path), "sources": [{"type": "csv", "name": "m", "manifest": "m.csv",
                                                         "root": "imgs"}], "target": {"column": "label"}},
            "model": {"backbone": "test_resnet"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "m.csv").write_text("path,label\na.jpg,x\na.jpg,y\n")
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2 and "listed twice (first on line 2)" in result.output
    (tmp_path / "m.csv").write_text("path,label\na.jpg,x\n../r.yaml,y\n")
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2 and "points outside the image root" in result.output
    for outside in ("/etc/passwd", "/dev/zero"):  # absolute paths obey the same rule (they were let through)
        (tmp_path / "m.csv").write_text(f"path,label\na.jpg,x\n{outside},y\n")
        result = CliRunner().invoke(main, ["validate", str(tmp_path / "r.yaml")])
        assert result.exit_code == 2 and f"path '{outside}' points outside the image root" in result.output
        assert "allow_outside_root: true" in result.output
    (tmp_path / "imgs" / "link.jpg").symlink_to(img / first)  # a link that leads out of the root
    (tmp_path / "m.csv").write_text("path,label\na.jpg,x\nlink.jpg,y\n")
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2 and "points outside the image root" in result.output


# ------------------------------------------------------------------------------------------- fuzzed recipes
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(-2, 2, allow_nan=False),
                    st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3),
                    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2))


def _paths(d, prefix=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _child(parent, key):
    if isinstance(parent, dict):
        return parent.get(key)
    if isinstance(parent, list) and isinstance(key, int) and key < len(parent):
        return parent[key]
    return None


@pytest.fixture(scope="module")
def base_recipe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    return tmp, yaml.safe_load(tiny_recipe(tmp).read_text())


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_recipes_validate_or_fail_clearly(base_recipe, data):
    import copy

    tmp, base = base_recipe
    recipe = copy.deepcopy(base)
    paths = list(_paths(recipe))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = recipe
        for k in path[:-1]:
            parent = _child(parent, k)
        key = path[-1]
        if not isinstance(parent, (dict, list)) or (isinstance(parent, list) and not isinstance(key, int)):
            continue
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if isinstance(parent, dict) and action == "delete":
            parent.pop(key, None)
        elif isinstance(parent, dict) and action == "add":
            parent[data.draw(st.text(min_size=1, max_size=8))] = data.draw(_VALUES)
        elif isinstance(parent, dict) or (isinstance(parent, list) and key < len(parent)):
            parent[key] = data.draw(_VALUES)
    text = yaml.safe_dump(recipe) if data.draw(st.booleans()) else yaml.safe_dump(recipe)[: data.draw(st.integers(0, 400))]
    (tmp / "fuzz.yaml").write_text(text)
    result = CliRunner().invoke(main, ["validate", str(tmp / "fuzz.yaml")])
    assert result.exit_code in (0, 2), (text, result.output, result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert str(tmp / "fuzz.yaml") in result.output and "Fix:" in result.output


@pytest.mark.slow
def test_two_processes_match_one_process_at_the_same_global_batch_unless_batch_norm(tmp_path):
    """Why `--processes 2` gave other figures than one process: per-process batch-norm statistics. Without batch
    norm (test_vit, LayerNorm) 2 processes x batch 4 and 1 process x batch 8 train the same steps; with it
    (test_resnet) each process normalises with its own 4 images, and the figures move."""
    losses = {}
    for backbone in ("test_vit", "test_resnet"):
        folder = tmp_path / backbone
        folder.mkdir()
        path = tiny_recipe(folder, model={"backbone": backbone}, validation={"type": "holdout", "ratio": 1 / 3},
                           transforms={"image_size": 32, "train": []},
                           train={"epochs": 2, "batch_size": 8, "num_workers": 0})
        for name, extra in (("one", []), ("two", ["--processes", "2", "--set", "train.batch_size=4"])):
            out = subprocess.run([sys.executable, "-m", "framework.cli", "run", str(path), "--name", name, *extra],
                                 env=ENV, capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stderr[-2000:]
            losses[backbone, name] = [(r["train"]["loss"], r["val"]["loss"]) for r in _metrics(folder / "runs" / name)]
    assert np.allclose(losses["test_vit", "one"], losses["test_vit", "two"], atol=1e-5)
    assert not np.allclose(losses["test_resnet", "one"], losses["test_resnet", "two"], atol=1e-3)


def test_fast_path_resolution_is_path_resolve(tmp_path):
    """The manifest reader resolves each folder once (validate on 100k rows must not lstat every component of every
    path); the result is exactly Path.resolve(), with links to files and to folders, `..`, `.` and missing files."""
    from framework.data.readers import _RealPaths

    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "o.jpg").write_bytes(b"x")
    (tmp_path / "data" / "a" / "f.jpg").write_bytes(b"x")
    (tmp_path / "data" / "a" / "link.jpg").symlink_to(tmp_path / "outside" / "o.jpg")
    (tmp_path / "data" / "dirlink").symlink_to(tmp_path / "outside")
    (tmp_path / "data" / "a" / "chain.jpg").symlink_to("link.jpg")  # relative link to a link
    root = tmp_path / "data"
    cases = ["a/f.jpg", "a/link.jpg", "a/chain.jpg", "dirlink/o.jpg", "a/../a/f.jpg", "dirlink/../data/a/f.jpg",
             "a/./f.jpg", "a/missing.jpg", "nowhere/x.jpg", "a/..", "a/.", "a/", str(tmp_path / "outside/o.jpg")]
    real = _RealPaths()
    for rel in cases * 2:  # the second round is served from the folder cache
        assert real(root / rel) == (root / rel).resolve(), rel
