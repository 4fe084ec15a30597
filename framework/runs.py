"""Run folders: a new one (name, provenance, split, labels), resuming one, and the state of a sweep member.

A run folder holds recipe.resolved.yaml, split.csv, labels.json, metrics.jsonl, summary.json, checkpoints/ and tb/.
Everything that decides what happens to an existing folder lives here, so `run`, `--resume`, sweeps and
cross-validation agree about it.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

import yaml

from framework.errors import Issue, RunError
from framework.folders import RunFolder
from framework.processes import main_process
from framework.recipe.loaded import load_recipe, resolved_yaml


def new_run_dir(root: Path, stem: str, name: str | None) -> Path:
    """`root/name` (which must not exist, unless it is a run that failed before its first epoch: it is removed and
    tried again), or `root/<stem>-<date>-<time>` made unique."""
    if name:
        run_dir = root / name
        if run_dir.exists() and _never_trained(run_dir):
            import shutil

            shutil.rmtree(run_dir)
        if run_dir.exists():
            raise RunError(Issue(f"run folder {run_dir} already exists.", field="--name",
                                 fix=f"choose another --name, or continue it with `recipe run --resume {run_dir}`."))
        return run_dir
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, n = root / f"{stem}-{stamp}", 2
    while run_dir.exists():
        run_dir = root / f"{stem}-{stamp}-{n}"
        n += 1
    return run_dir


def create(run_dir: Path, resolved, recipe_path: Path, overrides) -> dict:
    """Make the folder and write what the run is: resolved recipe, split, labels; returns the first summary."""
    recipe, plan, folder = resolved.recipe, resolved.plan, RunFolder(run_dir)
    run_dir.mkdir(parents=True)
    folder.checkpoints.mkdir()
    folder.write_recipe(resolved_yaml(recipe))
    folder.write_split(plan)
    folder.write_labels(plan.labels)
    return {"name": run_dir.name, "recipe": str(recipe_path.resolve()), "status": "running",
            "started": _dt.datetime.now().isoformat(timespec="seconds"), "notes": recipe.notes,
            "overrides": list(overrides), "backbone": recipe.model.backbone,
            "classes": {t: lab.classes for t, lab in plan.labels.items()},
            "counts": plan.counts(), "dropped_rows": plan.dropped, "unused_rows": len(plan.indices("unused")),
            "fast_dev_run": int(os.environ.get("RECIPE_FAST_DEV_RUN") or 0) or None,
            "versions": _versions(), "git_commit": _git_commit(recipe_path.resolve().parent), "wall_seconds": 0.0}


def _never_trained(run_dir: Path) -> bool:
    """A run folder whose run failed, was stopped or was killed before its first epoch's checkpoint: nothing in it
    is worth keeping."""
    folder = RunFolder(run_dir)
    try:
        summary = folder.summary()
    except RunError:
        return False
    if summary["name"] != run_dir.name:
        return False
    status = summary["status"]
    ended = status in ("failed", "interrupted") or (status == "running" and process_gone(summary.get("process")))
    return ended and not summary.get("epochs_done") and not folder.has_checkpoint()


def clean_partial_writes(run_dir: Path) -> list[Path]:
    """Remove the temporary files of writes a killed process never finished (`.<name>.XXXX.tmp`, up to a
    checkpoint's size each); returns them."""
    partial = [p for p in run_dir.rglob(".*.tmp") if p.is_file()]
    for p in partial:
        p.unlink(missing_ok=True)
    return partial


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "timm", "albumentations", "accelerate", "pydantic"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if out.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def this_process() -> dict:
    """Who trains a run (host, pid): recorded in its summary, so that a later command can tell a run whose
    process is gone (killed) from one still training."""
    return {"host": platform.node(), "pid": os.getpid()}


# ------------------------------------------------------------------------------------------------ resume
def resume_state(run_dir: Path, overrides) -> tuple:
    """The loaded recipe, the checkpoint and the summary of a run to continue, after checking that it can be:
    its folder, its last checkpoint, its data and split unchanged, epochs left. Returns (loaded, state, summary)."""
    from framework.engine import checkpoint as ckpt

    folder = RunFolder(run_dir)
    resolved, last = folder.recipe_file, folder.checkpoint("last")
    if not resolved.is_file():
        raise RunError(Issue(f"{run_dir} is not a run folder (no recipe.resolved.yaml).", field="--resume",
                             fix="give the folder that `recipe run` created."))
    if not last.is_file():
        raise RunError(Issue(f"{run_dir} has no checkpoint yet (checkpoints/last.pt): it stopped before the "
                             "first epoch ended.", field="--resume", fix="start it again with `recipe run`."))
    bad = [o for o in overrides if not o.startswith("train.epochs=")]
    if bad:
        raise RunError(Issue(f"--set {bad[0]} cannot change a run that is resumed (it would no longer be the "
                             "same experiment); only train.epochs can be raised.", field="--set",
                             fix="start a new run with the change instead."))
    loaded = load_recipe(resolved, overrides, run_plugins=False)  # a run folder's plugins: only if named
    try:
        state = ckpt.load(last)
    except Exception as e:
        raise RunError(Issue(f"cannot read {last}: {e}.", field="--resume",
                             fix="restore the file, or resume from a numbered checkpoint copied to last.pt.")) from None
    if state["epoch"] >= loaded.recipe.train.epochs:
        raise RunError(Issue(f"{run_dir.name} already finished its {loaded.recipe.train.epochs} epochs.",
                             field="--resume", fix="raise them with --set train.epochs=N to train longer."))
    summary = folder.summary()
    folder.metrics()  # damaged files are refused now, before anything in the folder changes
    folder.cam_images()
    summary.update(status="running", resumed_at_epoch=state["epoch"])
    clean_partial_writes(run_dir)
    return loaded, state, summary


ADDED_LATER = ("transforms.face_detector", "tune")  # settings newer than some checkpoints


def check_same_recipe(run_dir: Path, recipe, state: dict) -> None:
    """The recipe a run resumes with is the one its checkpoint was trained with (train.epochs aside): an edited
    recipe.resolved.yaml (another batch size, augmentation, learning rate, backbone) is refused, naming the keys."""
    from framework.recipe.loaded import edited_keys, flatten

    if "recipe" not in state:  # a checkpoint written before checkpoints carried their recipe
        return
    now, then = flatten(recipe.model_dump(mode="json")), flatten(state["recipe"])
    keys = [k for k in edited_keys(recipe.model_dump(mode="json"), state["recipe"])
            if k in then or not k.startswith(ADDED_LATER)]  # a checkpoint older than these settings lacks them
    if keys:
        shown = "; ".join(f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in keys[:6]) + (" ..." if len(keys) > 6 else "")
        raise RunError(Issue(f"the recipe changed since this run's checkpoint was written ({shown}); a resumed run "
                             "must be the same experiment.", field="--resume", file=str(RunFolder(run_dir).recipe_file),
                             fix="undo the edit, or start a new run with the change; only train.epochs can be raised "
                                 "(--set train.epochs=N)."))


def check_same_split(run_dir: Path, plan) -> None:
    folder = RunFolder(run_dir)
    if [(r["path"], s) for r, s in zip(plan.rows, plan.sides)] != folder.split_pairs():
        raise RunError(Issue("the data or its split changed since this run started (split.csv differs).",
                             field="--resume", file=str(folder.file(folder.SPLIT)),
                             fix="restore the data, or start a new run."))


# ------------------------------------------------------------------------------------- sweep members
def member_state(path, overrides, name: str, concrete) -> tuple[str, Path] | None:
    """None: no folder yet; ("kept", dir): finished with this recipe; ("resume", dir): interrupted with it.
    A folder that failed, may still be training, or holds another recipe stops with the fix (nothing is touched).
    `concrete(loaded)` fills in what `run` fills in before writing the resolved recipe (the image size)."""
    loaded = load_recipe(path, overrides)
    run_dir = Path(loaded.recipe.output.root) / name
    if not run_dir.exists():
        return None
    again = f"remove {run_dir} to train it again, or choose another --name"
    try:
        folder = RunFolder(run_dir)
        summary, before = folder.summary(), folder.recipe_dict()
    except RunError as e:
        raise RunError(Issue(f"run folder {run_dir} already exists, and is not a readable run folder "
                             f"({e.issues[0].format()})", field="--name", fix=f"{again}.")) from None
    concrete(loaded)
    if before != yaml.safe_load(resolved_yaml(loaded.recipe)):
        raise RunError(Issue(f"run folder {run_dir} already exists and was trained with another recipe.",
                             field="--name", fix=f"{again} (`recipe compare` shows what changed)."))
    return _decide(run_dir, summary, again)


def _decide(run_dir: Path, summary: dict, again: str) -> tuple[str, Path]:
    status = summary.get("status")
    if status == "running" and process_gone(summary.get("process")):
        status = "interrupted"  # killed (out of memory, SIGKILL, a lost session) before it could say so
    if status == "finished":
        return "kept", run_dir
    if status == "interrupted" and RunFolder(run_dir).checkpoint("last").is_file():
        return "resume", run_dir
    if status == "failed":
        why = f"it failed earlier ({summary.get('error', 'no error recorded')})"
    elif status == "pruned":
        why = f"a tuning study stopped it early ({(summary.get('pruned') or {}).get('why', 'pruned')})"
    elif status == "running":
        why = ("its summary says it is still running, and its process may be training it (on another machine, "
               f"or here as pid {(summary.get('process') or {}).get('pid', '?')}); if it is not, continue it with "
               f"`recipe run --resume {run_dir}`")
    else:
        why = "it stopped before its first epoch ended"
    raise RunError(Issue(f"run folder {run_dir} already exists: {why}.", field="--name", fix=f"{again}."))


def process_gone(process: dict | None) -> bool:
    """Whether the process a run's summary names (host, pid) has ended, as far as this machine can tell."""
    if not process or process.get("host") != platform.node():
        return False  # another machine's (or an older run's) process: cannot tell
    try:
        os.kill(int(process["pid"]), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, KeyError):
        return False
    return False


# ------------------------------------------------------------------------------------------ processes
def distributed():
    """Accelerate's process state when several processes run (torchrun / accelerate launch), else a stand-in.

    Without a GPU, Accelerate must be told to use the CPU, or each process trains alone on all the data."""
    from types import SimpleNamespace

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState

        return PartialState(cpu=not torch.cuda.is_available())
    return SimpleNamespace(num_processes=1, wait_for_everyone=lambda: None)  # (the main one: processes.main_process)


def main_decides(dist, decide):
    """Call `decide()` on the main process only (a RunError counts as its answer), share the answer with every
    process, and raise it everywhere if it was an error."""
    answer = None
    if main_process():
        try:
            answer = decide()
        except RunError as e:
            answer = e
    if dist.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        answer, = broadcast_object_list([answer])
    if isinstance(answer, RunError):
        raise answer
    return answer
