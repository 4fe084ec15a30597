"""What a study found: a sheet of its trials (also trials.csv), the best parameters, their importances, and
best.yaml - a recipe that `extends` the base with the winning values, so `recipe run best.yaml` trains the best
trial again (checked: its resolved recipe is the best trial's, key for key)."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from framework.io import atomic_write_text, write_csv
from framework.recipe.load import parse_override
from framework.tune import space as sp
from framework.tune.study import Plan


def report(plan: Plan, study) -> dict:
    """The sheet as text, trials.csv and best.yaml in the study's folder, and the figures behind them."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    rows = [_row(plan, t) for t in trials if not t.user_attrs.get("surplus")]
    cols = ["trial", "state", plan.metric, *[k.split(".")[-1] for k in plan.spec.space], "epochs", "seconds",
            "run", "note"]
    plan.folder.mkdir(parents=True, exist_ok=True)
    write_csv(plan.folder / "trials.csv", ["trial", "state", plan.metric, *plan.spec.space, "epochs", "seconds",
                                           "run", "note"], [list(r.values()) for r in rows])
    out = {"study": plan.name, "storage": plan.storage, "metric": plan.metric, "direction": plan.direction,
           "trials": rows, "counts": _counts(trials), "folder": str(plan.folder), "best": None}
    lines = [f"study {plan.name} ({plan.storage}): " + ", ".join(f"{n} {s.lower()}" for s, n in out["counts"].items())]
    lines += _table(cols, [list(r.values()) for r in rows])
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    if complete:
        best = study.best_trial
        params = sp.from_optuna(plan.spec.space, best.params)
        best_yaml, differs = write_best(plan, best.number, params, best.user_attrs.get("run_dir"))
        out["best"] = {"trial": best.number, "value": best.value, "params": params, "run": best.user_attrs.get(
            "run_dir"), "best_yaml": str(best_yaml), "differs": differs, "importances": _importances(study)}
        lines += _best_lines(plan, out["best"])
    else:
        lines.append("no trial has finished yet: no best parameters.")
    out["text"] = "\n".join(lines)
    atomic_write_text(plan.folder / "report.txt", out["text"] + "\n")
    return out


def _row(plan: Plan, t) -> dict:
    params = sp.from_optuna(plan.spec.space, t.params)
    seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
        else None
    value = t.value if t.state.name == "COMPLETE" else (t.intermediate_values[max(t.intermediate_values)]
                                                       if t.intermediate_values else None)
    note = {"PRUNED": f"pruned at epoch {max(t.intermediate_values)}" if t.intermediate_values else "pruned",
            "FAIL": t.user_attrs.get("error") or ("interrupted" if "run_dir" in t.user_attrs else "")}.get(
        t.state.name, "")
    if "retry_of" in t.user_attrs:
        note = (note + "; " if note else "") + f"retries trial {t.user_attrs['retry_of']}"
    return {"trial": t.number, "state": t.state.name.lower(), "value": None if value is None else round(value, 4),
            **{k: sp.as_yaml(params[k]) if k in params else "" for k in plan.spec.space},
            "epochs": max(t.intermediate_values) if t.intermediate_values else "",
            "seconds": "" if seconds is None else round(seconds), "run": Path(t.user_attrs.get("run_dir", "")).name,
            "note": note[:80]}


def _counts(trials) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in trials:
        if not t.user_attrs.get("surplus"):
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def _table(cols: list[str], rows: list[list]) -> list[str]:
    cells = [cols] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]


def _importances(study) -> dict[str, float]:
    """fANOVA importances of the parameters over the finished trials (none with fewer than two, or when Optuna
    cannot compute them, e.g. one parameter never varied)."""
    import optuna

    if len([t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]) < 2:
        return {}
    try:
        return {k: round(float(v), 3) for k, v in optuna.importance.get_param_importances(study).items()}
    except Exception:  # noqa: BLE001 - Optuna refuses for its own reasons (too few distinct values)
        return {}


def _best_lines(plan: Plan, best: dict) -> list[str]:
    lines = [f"best: trial {best['trial']}, {plan.metric} {best['value']:.4f} ({best['run']})",
             "best parameters: " + ", ".join(f"{k}={sp.as_yaml(v)}" for k, v in best["params"].items())]
    if best["importances"]:
        lines.append("importances: " + ", ".join(f"{k} {v:.2f}" for k, v in best["importances"].items()))
    lines.append(f"best.yaml: {best['best_yaml']} (`recipe run {best['best_yaml']}` trains it again)")
    if best["differs"]:
        lines.append("warning: best.yaml resolves differently from the trial in " + ", ".join(best["differs"][:5])
                     + "; rerun the trial with `recipe run " + f"{plan.recipe} --set ...` as its summary.json says")
    return lines


def write_best(plan: Plan, number: int, params: dict, run_dir: str | None) -> tuple[Path, list[str]]:
    """best.yaml: `extends` the base recipe, with the command's overrides and the trial's values set; returns it
    and the keys in which it resolves differently from the trial's own recipe (none, normally)."""
    tree: dict = {}
    for text in _trial_overrides(plan, params, run_dir):
        path, value = parse_override(text)
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    out = plan.folder / "best.yaml"
    base = os.path.relpath(plan.recipe.resolve(), plan.folder.resolve())
    head = (f"# The best trial ({number}) of study {plan.name}, by {plan.metric}; written by `recipe tune`.\n"
            f"#   recipe run {out}\n")
    text = yaml.safe_dump({"extends": base, **tree, "tune": None}, sort_keys=False, allow_unicode=True)
    atomic_write_text(out, head + text)
    return out, _differs(out, run_dir)


def _trial_overrides(plan: Plan, params: dict, run_dir: str | None) -> list[str]:
    """What the trial ran with: its run folder's own record when this machine has it, else the plan's."""
    from framework.folders import RunFolder

    try:
        recorded = RunFolder(Path(run_dir or "")).summary().get("overrides")
    except Exception:  # noqa: BLE001 - the trial ran on another machine: its parameters say the same
        recorded = None
    return list(recorded) if recorded else plan.trial_overrides(params)


def _differs(best_yaml: Path, run_dir: str | None) -> list[str]:
    from framework.folders import RunFolder
    from framework.backbones import resolve_inputs
    from framework.recipe.loaded import edited_keys, flatten, load_recipe
    from framework.resolve import check_face_detector
    from framework.runs import ADDED_LATER

    try:
        then = RunFolder(Path(run_dir or "")).recipe_dict()
    except Exception:  # noqa: BLE001 - the trial's folder is on another machine, or gone
        return []
    loaded = load_recipe(best_yaml)
    now = loaded.recipe
    with loaded.errors_located():  # what `run` makes concrete before it writes the run folder
        check_face_detector(now)
        if now.transforms.image_size == "auto":
            now.transforms.image_size = resolve_inputs(now)[0]
    had = flatten(then)
    return [k for k in edited_keys(now.model_dump(mode="json"), then, ignore=("output.root", "tune"))
            if k in had or not k.startswith(ADDED_LATER)]
