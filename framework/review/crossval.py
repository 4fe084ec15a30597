"""Cross-validation: the fold runs of a k-fold recipe scored as one validation set.

Each fold's kept checkpoint (`best.pt`) was validated on that fold's held-out groups, and the k held-out parts cover
every labelled item once. Summing the confusion matrices of the kept epochs therefore scores every item by a model
that never trained on it ("out-of-fold"), and a rare class is judged on all of its items instead of one holdout's
share (92 `incorrect` faces instead of 18 on the kaggle crops), so one lucky or unlucky draw no longer decides.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from framework.engine.metrics import scores, task_scores
from framework.errors import Issue, RunError

# keys in which the folds of one cross-validation may differ
_FOLD_KEYS = ("validation.fold", "output.", "notes", "logging.progress")


def pooled(runs: list[Path]) -> dict:
    """The out-of-fold scores of the fold runs `runs` (all k folds of one recipe, each finished), with each fold's
    own figures beside them. Raises RunError naming the run and the fix when the runs are not such a set."""
    if not runs:
        raise RunError(Issue("no fold runs given.", field="RUNS",
                             fix="give the run folders of every fold, e.g. runs/NAME-fold*."))
    folds = sorted((_fold(run) for run in runs), key=lambda f: f["fold"])
    k = folds[0]["k"]
    _check_same_recipe(folds)
    seen = [f["fold"] for f in folds]
    if len(set(seen)) != len(seen):
        twice = next(i for i in seen if seen.count(i) > 1)
        names = ", ".join(f["run"].name for f in folds if f["fold"] == twice)
        raise RunError(Issue(f"fold {twice} is given twice ({names}).", field="RUNS", fix="give each fold's run once."))
    missing = sorted(set(range(k)) - set(seen))
    if missing:
        raise RunError(Issue(f"fold(s) {', '.join(map(str, missing))} of {k} are missing: the pooled scores need "
                             "every item validated once.", field="RUNS",
                             fix=f"train them (`recipe run RECIPE --set validation.fold={missing[0]}`, or all folds "
                                 "with --all-folds) and give every fold's run."))
    val = _pool([f["record"] for f in folds])
    per_fold = [{"run": f["run"].name, "fold": f["fold"], "best_epoch": f["epoch"],
                 "macro_f1": f["record"]["macro_f1"], "accuracy": f["record"]["accuracy"]} for f in folds]
    f1s = np.array([p["macro_f1"] for p in per_fold])
    return {"folds": k, "runs": [f["run"].name for f in folds], "val": val, "per_fold": per_fold,
            "fold_macro_f1": {"mean": float(f1s.mean()), "std": float(f1s.std(ddof=1)) if len(f1s) > 1 else 0.0},
            "wall_seconds": float(sum(f["wall"] for f in folds))}


def _fold(run: Path) -> dict:
    """One fold run: its fold index, k, its resolved recipe (flat) and the validation record of its kept epoch."""
    from framework.folders import RunFolder
    from framework.recipe.loaded import flatten

    folder = RunFolder(run)
    recipe_path = folder.recipe_file
    if not folder.is_run() or not folder.file(folder.SUMMARY).is_file():
        raise RunError(Issue(f"{run} is not a run folder (no {folder.RECIPE} or {folder.SUMMARY}).", field="RUNS",
                             fix="give the folders that `recipe run --all-folds` created."))
    recipe = folder.recipe_dict()
    policy = recipe.get("validation") if isinstance(recipe.get("validation"), dict) else {}
    if policy.get("type") != "kfold":
        raise RunError(Issue(f"{run} was validated by {policy.get('type', 'an unknown policy')!r}, not by k-fold.",
                             field="validation", file=str(recipe_path),
                             fix="give the runs of a k-fold recipe (validation: {type: kfold, k: 5})."))
    summary = folder.summary()
    if summary.get("status") != "finished":
        raise RunError(Issue(f"{run} is {summary.get('status', 'unfinished')} (epoch {summary.get('epochs_done', 0)} "
                             f"of {(recipe.get('train') or {}).get('epochs', '?')}).", field="RUNS",
                             fix=f"finish it with `recipe run --resume {run}` first."))
    record = folder.kept_record(summary.get("best_epoch"))
    if record is None:
        raise RunError(Issue(f"{run} has no validated epoch in metrics.jsonl.", field="RUNS",
                             fix=f"train it again (`recipe run --resume {run}` if it stopped early)."))
    if not isinstance(policy.get("k"), int) or not isinstance(policy.get("fold", 0), int):
        raise RunError(Issue(f"{run}: the recipe's k-fold policy has no whole k and fold.", field="validation",
                             file=str(recipe_path), fix="restore the run folder's recipe (it must not be edited)."))
    return {"run": run, "fold": policy.get("fold", 0), "k": policy["k"], "epoch": record["epoch"],
            "record": record["val"], "recipe": flatten(recipe), "wall": summary.get("wall_seconds") or 0.0}


def _check_same_recipe(folds: list[dict]) -> None:
    """Pooling folds of different recipes (another k, seed, backbone ...) would score no single recipe."""
    from framework.review.compare import changed

    first = folds[0]
    for f in folds[1:]:
        diff = [c for c in changed(f["recipe"], first["recipe"]) if not c.startswith(_FOLD_KEYS)]
        if diff:
            raise RunError(Issue(f"{f['run'].name} and {first['run'].name} are not folds of one recipe: "
                                 f"{'; '.join(diff[:3])}.", field="RUNS",
                                 fix="give the fold runs of one `recipe run --all-folds` (runs/NAME-fold*)."))


def _pool(records: list[dict]) -> dict:
    """Sum the confusion matrices of the folds' validation records (one task, or each task and the composite; a
    composite head's questions too)."""
    def part(parts: list[dict]) -> dict:
        classes = list(parts[0]["per_class"])
        cm = np.sum([np.array(p["confusion"]) for p in parts], axis=0)
        out = scores(cm, classes)
        if all("questions" in p for p in parts):  # a composite head: each question pooled the same way
            out["questions"] = {q: part([p["questions"][q] for p in parts]) for q in parts[0]["questions"]}
        return out

    first = task_scores(records[0])
    if "" in first:  # single-task records
        return part(records)
    tasks = {t: part([task_scores(r)[t] for r in records]) for t in first}
    out = {"accuracy": float(np.mean([s["accuracy"] for s in tasks.values()])),
           "macro_f1": float(np.mean([s["macro_f1"] for s in tasks.values()])), "tasks": tasks}
    if all("composite" in r for r in records):
        out["composite"] = part([r["composite"] for r in records])
    return out


def wants_decision(run: Path) -> bool:
    """Whether a fold run's recipe asks for the macro-F1 decision rule (eval.decision)."""
    from framework.folders import RunFolder

    recipe = RunFolder(run).recipe_dict()
    return isinstance(recipe.get("eval"), dict) and recipe["eval"].get("decision") == "macro_f1"


def report(result: dict) -> str:
    """Terminal text: the pooled per-class table of each task and the per-fold figures."""
    from framework.engine.metrics import format_report

    val = result["val"]
    tasks = task_scores(val)
    n = sum(m["support"] for m in next(iter(tasks.values()))["per_class"].values())
    lines = [f"cross-validated over {result['folds']} folds (every item scored once by the fold model that did not "
             f"train on it; {n} items): macro-F1 {val['macro_f1']:.3f}, accuracy {val['accuracy']:.3f}"]
    parts = {f"{t}: " if t else "": s for t, s in tasks.items()}
    for prefix, s in parts.items():
        if prefix:
            lines.append(f"{prefix}macro-F1 {s['macro_f1']:.3f}")
        lines.append(format_report(s))
    f = result["fold_macro_f1"]
    lines.append("per fold (kept epoch): " + ", ".join(f"{p['fold']}: {p['macro_f1']:.3f} @{p['best_epoch']}"
                                                       for p in result["per_fold"])
                 + f"; mean {f['mean']:.3f} +/- {f['std']:.3f}")
    if result.get("decision"):
        from framework.inference.decision import report_lines
        lines += report_lines(result["decision"])
    return "\n".join(lines)

