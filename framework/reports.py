"""What the commands print, made from what the API returns, so that the CLI imports nothing but `framework.api`
(which re-exports these) and `framework.errors`: the CLI parses, calls, prints."""
from __future__ import annotations

import json
from pathlib import Path


def validated(recipe: str | Path, resolved, full: bool = False) -> str:
    """`recipe validate`'s answer: with `full`, the resolved recipe and each task's classes first."""
    from framework.recipe.loaded import resolved_yaml

    plan, lines = resolved.plan, []
    if full:
        lines.append(resolved_yaml(resolved.recipe).rstrip("\n"))
        for task, labels in plan.labels.items():
            lines.append(f"# {task} classes (index = {labels.formula}):")
            lines += [f"#   {k:3d}  {c}" for k, c in enumerate(labels.classes)]
    tasks = ", ".join(f"{t}: {len(lab.classes)} classes" for t, lab in plan.labels.items())
    lines.append(f"ok: {recipe}: {len(plan.rows)} images ({tasks}), "
                 f"{len(plan.indices('train'))} train / {len(plan.indices('val'))} val")
    return "\n".join(lines)


def finished_runs(run_dirs: list[Path], all_folds: bool, summary_of) -> list[str]:
    """After `recipe run`: each run's best figure and kept classes; with all folds, the cross-validated report."""
    from framework.review import crossval
    from framework.review.compare import kept_classes

    lines = []
    for run_dir in run_dirs:
        summary = summary_of(run_dir)
        best = summary.get("best_value")
        value = f"{best:.4f}" if isinstance(best, (int, float)) else "none"  # rounded as the epoch lines are
        lines.append(f"done: {run_dir}  best {summary.get('best_metric')} = {value} at epoch "
                     f"{summary.get('best_epoch')}  ({summary['wall_seconds']:.0f}s)")
        lines += ["  " + line for line in kept_classes(run_dir, summary.get("best_epoch"))]
    if all_folds:
        from framework.io import read_text

        cv_file = run_dirs[0].parent / f"{run_dirs[0].name.rsplit('-fold', 1)[0]}-cv.json"
        lines += [crossval.report(json.loads(read_text(cv_file))), f"wrote {cv_file}"]
    return lines


def crossval_report(result: dict) -> str:
    from framework.review import crossval

    return crossval.report(result)


def inspect_report(report: dict) -> str:
    from framework.review.inspect import format_report

    return format_report(report)


def voting_rule(method: str, weights, composite, tta, prior_shift):
    """How `recipe ensemble` combines its runs (framework.inference.ensemble.Voting)."""
    from framework.inference.ensemble import Voting

    return Voting(method, weights, composite, tta, prior_shift)
