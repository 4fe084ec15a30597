"""Validate merged recipe data against the schema and turn pydantic's errors into located, fixable issues."""
from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from framework.errors import Issue, RecipeError, did_you_mean
from framework.recipe.load import Locs, field_path, issue_at
from framework.recipe.schema import Recipe


def validate_data(data: dict, locs: Locs, file: str | None = None) -> Recipe:
    """The validated Recipe, or RecipeError listing every problem with file, line and field."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(issues_from_validation(e, data, locs, file)) from None


def issues_from_validation(err: ValidationError, data: Any, locs: Locs, file: str | None,
                           model: type[BaseModel] = Recipe, prefix: tuple = ()) -> list[Issue]:
    grouped: dict[tuple, list[dict]] = {}
    for e in err.errors(include_url=False):
        grouped.setdefault(_data_path(e["loc"], data), []).append(e)
    issues = []
    for path, errs in grouped.items():
        message, fix = _explain(path, errs, model)
        issues.append(issue_at(locs, prefix + path, message, fix, file))
    return issues


def _data_path(loc: tuple, data: Any) -> tuple:
    """Drop what pydantic adds to a location that is not in the data: union tags and union member names."""
    out: list = []
    cur = data
    for i, el in enumerate(loc):
        if isinstance(cur, dict):
            if el in cur:
                out.append(el)
                cur = cur[el]
            elif el in (cur.get("type"), cur.get("name"), "plugin") or (i + 1 < len(loc) and loc[i + 1] in cur):
                continue  # discriminated-union tag (also a default one the data leaves out)
            else:
                out.append(el)  # a missing key
                cur = None
        elif isinstance(cur, list) and isinstance(el, int) and 0 <= el < len(cur):
            out.append(el)
            cur = cur[el]
        elif cur is None and not out[-1:] == [el] and isinstance(el, (str, int)) and not _is_member_label(el):
            out.append(el)
        # else: a union member label such as 'int' or 'tuple[int, int]' below a scalar or list
    return tuple(out)


def _is_member_label(el) -> bool:
    return isinstance(el, str) and ("[" in el or el in {"int", "float", "str", "bool", "list", "dict", "tuple"})


def _explain(path: tuple, errs: list[dict], model) -> tuple[str, str]:
    key = path[-1] if path else ""
    e = errs[0]
    kind = e["type"]
    if kind == "extra_forbidden":
        allowed = _fields_at(model, e["loc"][:-1]) or []
        near = did_you_mean(key, allowed)
        if not near:  # `train.lr`: the key exists, elsewhere in the tree (train.optimizer.lr)
            elsewhere = list(dict.fromkeys(".".join(p) for p in _all_fields(model) if p[-1] == key))
            near = (" Did you mean " + " or ".join(repr(x) for x in elsewhere[:3]) + "?") if elsewhere else ""
        return (f"unknown key {key!r}.{near}",
                "remove it or correct its spelling" + (f"; allowed here: {', '.join(allowed)}." if allowed else "."))
    if kind == "missing":
        parent = field_path(path[:-1]) or "the top level"
        return f"required field {key!r} is missing.", f"add `{key}: ...` under {parent}."
    if kind == "union_tag_invalid":
        ctx = e.get("ctx", {})
        tags = [t.strip(" '\"") for t in str(ctx.get("expected_tags", "")).split(",") if t.strip()]
        disc = ctx.get("discriminator", "type").strip("'")
        return (f"unknown {disc} {ctx.get('tag')!r}.{did_you_mean(ctx.get('tag'), tags)}",
                f"use one of: {', '.join(tags)}.")
    if kind == "union_tag_not_found":
        disc = e.get("ctx", {}).get("discriminator", "type").strip("'")
        disc = "type" if disc.endswith("()") else disc
        return f"this entry needs a `{disc}` key.", f"add `{disc}: ...` (see `recipe schema` for the choices)."
    if kind == "literal_error" and len(errs) == 1:
        expected = [x.strip(" '\"") for x in e.get("ctx", {}).get("expected", "").replace(" or ", ",").split(",")]
        expected = [x for x in expected if x]
        return (f"{e['input']!r} is not allowed.{did_you_mean(e['input'], expected)}",
                f"use one of: {', '.join(expected)}.")
    got = _short(e.get("input"))
    if len(errs) > 1:  # a plain union: each member complained
        msgs = sorted({_clean(x["msg"]) for x in errs})
        return f"got {got}, which matches none of the accepted forms: " + "; ".join(msgs) + ".", \
            "see `recipe schema` or the recipe tour in README.md for this field."
    return f"{_clean(e['msg'])} (got {got}).", _fix_for(kind)


def _clean(msg: str) -> str:
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ").rstrip(".")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fix_for(kind: str) -> str:
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return "write a value of the expected type."
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        return "use a value in the allowed range."
    if kind in {"too_short", "too_long"}:
        return "change the number of items."
    return "correct the value."


def _unwrap(t):
    while get_origin(t) is Annotated:
        t = get_args(t)[0]
    return t


def _submodels(annotation) -> list[type[BaseModel]]:
    """The pydantic models a field holds (through Optional, unions, lists, dicts and Annotated)."""
    t = _unwrap(annotation)
    if isinstance(t, type) and issubclass(t, BaseModel):
        return [t]
    return [m for arg in get_args(t) for m in _submodels(arg)]


def _all_fields(model, prefix: tuple = (), seen: frozenset = frozenset()) -> list[tuple]:
    """Every field path of a model tree, e.g. ("train", "optimizer", "lr")."""
    out = []
    for name, f in model.model_fields.items():
        out.append(prefix + (name,))
        for sub in _submodels(f.annotation):
            if sub not in seen:
                out += _all_fields(sub, prefix + (name,), seen | {sub})
    return out


def _fields_at(model, loc: tuple) -> list[str] | None:
    """Field names of the (sub)model reached by following a pydantic error location from `model`."""
    t: Any = model
    for el in loc:
        t = _unwrap(t)
        if isinstance(t, type) and issubclass(t, BaseModel):
            if el not in t.model_fields:
                return None
            t = t.model_fields[el].annotation
            continue
        origin = get_origin(t)
        if origin in (Union, types.UnionType):
            members = [_unwrap(m) for m in get_args(t)]
            tagged = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)
                      and any(el in get_args(m.model_fields[f].annotation)
                              for f in ("type", "name") if f in m.model_fields
                              and get_origin(m.model_fields[f].annotation) is Literal)]
            if tagged:
                t = tagged[0]
                continue
            models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
            if len(models) == 1:
                t = models[0]
                t = t.model_fields[el].annotation if el in t.model_fields else None
                continue
            return None
        if origin is list and isinstance(el, int):
            t = get_args(t)[0]
            continue
        if origin is dict:
            t = get_args(t)[1]
            continue
        return None
    t = _unwrap(t)
    if get_origin(t) in (Union, types.UnionType):
        models = [m for m in map(_unwrap, get_args(t)) if isinstance(m, type) and issubclass(m, BaseModel)]
        t = models[0] if len(models) == 1 else t
    if isinstance(t, type) and issubclass(t, BaseModel):
        return list(t.model_fields)
    return None


def path_problem(path: tuple, model: type[BaseModel] = Recipe) -> str | None:
    """None when the dotted recipe path `path` (("train", "optimizer", "lr")) can hold a value, else what is wrong,
    with a did-you-mean (`recipe tune`'s space keys are checked so before any trial starts)."""
    t: Any = model
    for depth, el in enumerate(path):
        t = _unwrap(t)
        where = ".".join(map(str, path[:depth])) or "the top level"
        if get_origin(t) in (Union, types.UnionType):
            options = [_unwrap(m) for m in get_args(t) if _unwrap(m) is not type(None)]
            models = [m for m in options if isinstance(m, type) and issubclass(m, BaseModel)]
            holding = [m for m in models if el in m.model_fields]
            if holding:
                t = holding[0].model_fields[el].annotation
                continue
            rest = [m for m in options if m not in models]
            if not rest:
                names = sorted({f for m in models for f in m.model_fields})
                return f"{where} has no key {el!r}.{did_you_mean(el, names)}"
            t = rest[0]
        if isinstance(t, type) and issubclass(t, BaseModel):
            if el not in t.model_fields:
                return f"{where} has no key {el!r}.{did_you_mean(el, list(t.model_fields))}"
            t = t.model_fields[el].annotation
        elif get_origin(t) is dict:
            t = get_args(t)[1] if get_args(t) else Any
        elif get_origin(t) in (list, tuple):
            if not str(el).isdigit():
                return f"{where} is a list: the next part of the path must be a position (0, 1, ...), not {el!r}."
            t = get_args(t)[0] if get_args(t) else Any
        elif t is Any:
            return None
        else:
            return f"{where} is a single value; it has no key {el!r}."
    return None
