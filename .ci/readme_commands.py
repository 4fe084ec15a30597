"""Run every command the README gives, exactly as written, the way a new user would (CI runs this after the tests).

Commands are the lines of the README's ```bash blocks (continuations joined, comments dropped), its ```python
block, and inline `recipe ...` / `bash ...` spans that are whole commands. Each runs in a scratch copy of recipes/,
plugins/, docs/ and scripts/ beside a link to ../shared (so runs/, photos/ and so on are the scratch folder's), in README
order, so a command can use what an earlier one made. `pip` commands run in the repository itself.

Training is shortened without touching the commands: RECIPE_FAST_DEV_RUN=8 keeps 8 images per class and side of
every recipe (every check, epoch, checkpoint and report still runs), except for the quickstart, the main job,
which runs in full. What the README takes for granted (a run called `mine`, a `photos/` folder, a `labelled.csv`)
is made first by FIXTURES. Commands that cannot run on this machine are in SKIP with the reason; an entry of SKIP,
EXPECTED or INTERRUPT that matches no README command is an error, so the tables cannot go stale.

    python .ci/readme_commands.py            # all; --list shows them; --only TEXT runs those containing TEXT
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

SKIP = {  # command -> why it cannot run here (the reason is printed)
    'pip install -e ".[dev]" && python -m pytest -q': "the test command: CI's own first step (.ci/run)",
    "accelerate launch --num_processes 4 -m framework.cli run recipes/hard_aug.yaml --name big":
        "needs 4 GPUs (CPU data parallelism is the --processes and torchrun lines)",
    "torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 --nproc_per_node 8 -m framework.cli "
    "run recipes/hard_aug.yaml --name big": "needs two machines",
    "recipe run --resume RUN_DIR": "RUN_DIR is a placeholder; `recipe run --resume runs/r18-96` runs",
    "accelerate launch --cpu --num_processes 2": "the README's example of what not to do",
    "recipe tune recipes/chandrikadeb7_mask_tune.yaml --storage postgresql://tuner@db.example.org/studies":
        "needs a PostgreSQL server (tests/test_tune.py starts one and runs two workers against it)",
}
EXPECTED = {  # command -> (exit code, text the output must hold): the README shows it failing on purpose
    "recipe run recipes/hard_aug.yaml --set data.root=/my/data": (2, "/my/data"),
}
INTERRUPT = {  # command -> the run folder whose first epoch ends it with Ctrl-C (so the next line has work to resume)
    "recipe run recipes/hard_aug.yaml --set model.backbone=resnet18 --set transforms.image_size=96 --name r18-96":
        "runs/r18-96",
}
FULL = {'pip install -e ".[quickstart]" && recipe run recipes/quickstart.yaml'}  # the main job: not shortened
IN_REPO = re.compile(r"^pip install")  # run in the repository (an editable install of the scratch copy would stay)
TIMEOUT = 15 * 60

TASK = "{column: mask_state, classes: [wear, incorrect, not_wear]}"
FIXTURES = [  # what the README's commands take for granted, made before them
    "recipe run recipes/hard_aug.yaml --name mine",
    "recipe run recipes/utk_age_regression.yaml --name age-reg",
    f'recipe run recipes/multitask_mask_utk.yaml --name mask --set "tasks={{mask: {TASK}}}"',
    'recipe run recipes/multitask_mask_utk.yaml --name gender --set "tasks={gender: {column: gender, classes: [male, female]}}"',
    'recipe run recipes/multitask_mask_utk.yaml --name age --set "tasks={age: {column: age, bins: [30, 60]}}"',
]
COMMAND_START = re.compile(r"^(recipe|bash|python|pip|check-jsonschema|tensorboard|optuna-dashboard|torchrun|accelerate|"
                           r"_RECIPE)\b|eval ")
SERVERS = ("tensorboard", "optuna-dashboard")  # started, checked that they serve, stopped after 20 s


def readme_commands(text: str) -> list[tuple[str, str]]:
    """(kind, command) in README order: kind is "bash" or "python"."""
    found = []
    for m in re.finditer(r"```(\w*)\n(.*?)```|`([^`]+)`", text, flags=re.S):
        lang, block, span = m.groups()
        if span is not None:
            span = " ".join(span.split())
            whole = len(span.split()) > 1 and not re.fullmatch(r"recipe \w+", span)  # not a mere command name
            if COMMAND_START.match(span) and whole and ("bash", span) not in found:
                found.append(("bash", span))
        elif lang == "python":
            found.append(("python", block))
        elif lang == "bash":
            found += [("bash", c) for c in _block_commands(block)]
    return found


def _block_commands(block: str) -> list[str]:
    commands, current = [], ""
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line) if not line.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " "
            continue
        commands.append(" ".join(current.split()))
        current = ""
    return commands


def make_scratch(root: Path) -> Path:
    """A folder beside a link to ../shared, holding recipes/, plugins/, docs/, scripts/, benchmarks/ and the inputs
    the README assumes."""
    (root / "shared").symlink_to(SHARED.resolve())
    work = root / "repo"
    work.mkdir()
    for name in ("recipes", "plugins", "docs", "scripts", "benchmarks"):
        shutil.copytree(REPO / name, work / name)
    for name in ("README.md", "recipe.schema.json"):
        shutil.copy(REPO / name, work / name)
    crops = SHARED / "data" / "face_mask_kaggle3"
    rows = list(csv.DictReader(open(crops / "crops_manifest.csv", newline="", encoding="utf-8")))
    picked = [r for state in ("wear", "incorrect", "not_wear") for r in [x for x in rows if x["mask_state"] == state][:4]]
    (work / "photos").mkdir()
    (work / "labelled").mkdir()
    with open(work / "labelled.csv", "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["path", "mask_state"])
        for r in picked:
            name = Path(r["path"]).name
            shutil.copy(crops / r["path"], work / "labelled" / name)
            shutil.copy(crops / r["path"], work / "photos" / name)
            out.writerow([f"labelled/{name}", r["mask_state"]])
    return work


def run_one(kind: str, command: str, work: Path, log: Path) -> tuple[bool, str]:
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", RECIPE_CACHE=str(work / ".cache"))
    if command not in FULL:
        env["RECIPE_FAST_DEV_RUN"] = "8"
    args = ["bash", "-c", command] if kind == "bash" else [sys.executable, "-c", command]
    if kind == "bash" and command.startswith("_RECIPE_COMPLETE=fish_source"):
        if not shutil.which("fish"):
            return True, "skipped: fish is not installed (tests/test_cli.py checks the fish script)"
        args = ["fish", "-c", command]
    if "zsh_source" in command:
        if not shutil.which("zsh"):
            return True, "skipped: zsh is not installed (tests/test_cli.py checks the zsh script)"
        args = ["zsh", "-c", command]
    cwd = REPO if IN_REPO.match(command) else work
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        rc = _wait(proc, command, work)
    text = log.read_text(errors="replace")
    if command in EXPECTED:
        want_rc, want_text = EXPECTED[command]
        return rc == want_rc and want_text in text, f"exit {rc} (expected {want_rc}, with {want_text!r})"
    if command in INTERRUPT:
        return "resume" in text.lower() or "stopped" in text.lower(), f"exit {rc} after Ctrl-C"
    if command.startswith(SERVERS):
        return "http://" in text, "served (stopped after 20 s)"
    return rc == 0, f"exit {rc}"


def _wait(proc, command: str, work: Path) -> int:
    deadline = time.time() + (20 if command.startswith(SERVERS) else TIMEOUT)
    metrics = work / INTERRUPT[command] / "metrics.jsonl" if command in INTERRUPT else None
    while proc.poll() is None:
        if time.time() > deadline or (metrics and metrics.exists() and metrics.stat().st_size):
            os.killpg(proc.pid, signal.SIGINT)
            metrics = None
            deadline = time.time() + 120
            try:
                return proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                return proc.wait()
        time.sleep(0.05)
    return proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the commands and what happens to each")
    parser.add_argument("--only", help="run only the commands containing this text (after the fixtures)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    opts = parser.parse_args()
    commands = readme_commands((REPO / "README.md").read_text(encoding="utf-8"))
    stale = [c for table in (SKIP, EXPECTED, INTERRUPT) for c in table if c not in {c for _, c in commands}]
    if stale:
        print("entries that match no README command (update the tables):\n  " + "\n  ".join(stale))
        return 1
    if opts.list:
        for kind, c in commands:
            print(("SKIP " if c in SKIP else "run  ") + (c if kind == "bash" else "<python block>"))
        return 0
    root = Path(tempfile.mkdtemp(prefix="readme-"))
    work = make_scratch(root)
    (root / "logs").mkdir()
    failed = []
    todo = [("bash", c, "fixture") for c in FIXTURES] + [(k, c, "readme") for k, c in commands]
    for n, (kind, command, role) in enumerate(todo):
        shown = command if kind == "bash" else "<the README's python block>"
        if command in SKIP:
            print(f"SKIP {shown}\n     {SKIP[command]}")
            continue
        if opts.only and role == "readme" and opts.only not in command:
            continue
        start = time.time()
        ok, what = run_one(kind, command, work, root / "logs" / f"{n:02d}.log")
        label = "SKIP" if what.startswith("skipped") else "ok  " if ok else "FAIL"
        print(f"{label} {shown}\n     {what}, {time.time() - start:.0f}s"
              + (" (fixture)" if role == "fixture" else ""), flush=True)
        if not ok:
            failed.append(shown)
            print("     " + "\n     ".join((root / "logs" / f"{n:02d}.log").read_text(errors="replace").splitlines()[-25:]))
    print(f"\n{len(failed)} README command(s) failed" + (":\n  " + "\n  ".join(failed) if failed else "."))
    if opts.keep or failed:
        print(f"scratch folder kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
