"""The search space of a `tune:` section: parameters asked of an Optuna trial, written back as `--set` overrides,
and checked before any trial starts (every key a recipe path, every choice and range end a valid recipe)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from framework.errors import FieldError, RecipeError
from framework.recipe.schema.tune import ChoiceParam, FloatParam, IntParam

PRIMITIVE = (type(None), bool, int, float, str)
NOT_SEARCHED = ("tune", "output", "notes", "plugins")  # sections a trial may not change


def as_yaml(value: Any) -> str:
    """A value as one line of YAML, for `--set key=<this>` (strings quoted where YAML would read them otherwise)."""
    if isinstance(value, float):
        return repr(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True).strip()
    return text.removesuffix("...").strip()


def _choices(p: ChoiceParam) -> list:
    """The values Optuna sees: the choices themselves, or their YAML text when one is a list or mapping."""
    if all(isinstance(v, PRIMITIVE) for v in p.choice):
        return list(p.choice)
    return [as_yaml(v) for v in p.choice]


def suggest(trial, space: dict) -> dict[str, Any]:
    """Ask the trial for a value of every parameter; returns them by key, as the recipe takes them."""
    params = {}
    for key, p in space.items():
        if isinstance(p, FloatParam):
            params[key] = _stepped(p, trial.suggest_float(key, *p.float, log=p.log, step=p.step))
        elif isinstance(p, IntParam):
            params[key] = trial.suggest_int(key, *p.int, log=p.log, step=p.step or 1)
        else:
            picked = trial.suggest_categorical(key, _choices(p))
            params[key] = p.choice[_choices(p).index(picked)]
    return params


def from_optuna(space: dict, optuna_params: dict) -> dict[str, Any]:
    """A finished trial's parameters (as Optuna stored them) as the recipe takes them."""
    out = {}
    for key, value in optuna_params.items():
        p = space.get(key)
        if isinstance(p, ChoiceParam) and value in _choices(p):
            value = p.choice[_choices(p).index(value)]
        out[key] = _stepped(p, value) if isinstance(p, FloatParam) else value
    return out


def _stepped(p: FloatParam, value: float) -> float:
    """0.15000000000000002 (Optuna's low + 3 * step) -> 0.15: a stepped value as the user would write it."""
    return round(value, 10) if p.step is not None else value


def to_optuna(space: dict, params: dict) -> dict[str, Any]:
    """Parameters as the recipe takes them -> as Optuna stores them (for enqueueing a retry)."""
    return {k: (_choices(space[k])[space[k].choice.index(v)] if isinstance(space[k], ChoiceParam) else v)
            for k, v in params.items()}


def overrides(params: dict) -> list[str]:
    return [f"{key}={as_yaml(value)}" for key, value in params.items()]


def grid(space: dict) -> dict[str, list]:
    """Every value of every parameter, for the grid sampler: choices, and ranges with a step."""
    out, problems = {}, []
    for key, p in space.items():
        if isinstance(p, ChoiceParam):
            out[key] = _choices(p)
            continue
        low, high = p.float if isinstance(p, FloatParam) else p.int
        step = p.step if isinstance(p, FloatParam) else (p.step or 1)
        if step is None:
            problems.append((("tune", "space", key), f"the grid sampler needs a finite set of values, and {key} is "
                             "a continuous range.", "give the range a step (e.g. step: 0.05), or use a choice."))
            continue
        count = int(math.floor((high - low) / step + 1e-9)) + 1
        out[key] = [type(low)(round(low + i * step, 12)) if isinstance(low, float) else low + i * step
                    for i in range(count)]
    if problems:
        raise FieldError.many(problems)
    return out


def variants(p) -> list[tuple[tuple, Any]]:
    """The values to try when checking a parameter: each choice, and both ends of a range."""
    if isinstance(p, ChoiceParam):
        return [(("choice", i), v) for i, v in enumerate(p.choice)]
    kind = "float" if isinstance(p, FloatParam) else "int"
    low, high = getattr(p, kind)
    return [((kind, 0), low), ((kind, 1), high)]


def check_keys(space: dict) -> None:
    """Every key is a recipe path that can hold a value, and not one a trial may not change."""
    from framework.recipe.validate import path_problem

    problems = []
    for key in space:
        parts = tuple(int(x) if x.isdigit() else x for x in key.split("."))
        if parts[0] in NOT_SEARCHED:
            problems.append((("tune", "space", key), f"{key!r} cannot be searched: a trial's {parts[0]} is not a "
                             "hyper-parameter.", f"search model, data, transforms, train, eval or tasks values."))
            continue
        problem = path_problem(parts) if all(parts) else f"{key!r} has an empty part."
        if problem:
            problems.append((("tune", "space", key), f"{key!r} is not a recipe path: {problem}",
                             "write the dotted path of a recipe value, e.g. train.optimizer.lr (`recipe schema` "
                             "lists them)."))
    if problems:
        raise FieldError.many(problems)


def check_values(path: str | Path, base_overrides: list[str], space: dict, check_one) -> list[tuple]:
    """Each choice and range end, set alone on the base recipe, makes a recipe that passes `check_one(loaded,
    key)`; returns the problems as (key path, message, fix)."""
    from framework.recipe.loaded import load_recipe

    problems = []
    for key, p in space.items():
        for where, value in variants(p):
            try:
                check_one(load_recipe(path, list(base_overrides) + [f"{key}={as_yaml(value)}"]), key)
            except RecipeError as e:
                first = e.issues[0]
                said = (f"{first.field}: " if first.field else "") + first.message
                problems.append((("tune", "space", key) + where, f"{key} = {as_yaml(value)} does not make a valid "
                                 f"recipe: {said}", first.fix or "remove the value or change the range."))
    return problems
