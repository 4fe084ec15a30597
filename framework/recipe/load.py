"""Read recipe YAML with line numbers, apply `extends:` and `--set` overrides, validate, and map errors to lines.

A recipe travels as a plain dict plus a location map: every key path (a tuple such as ``("train", "lr")`` or
``("transforms", "train", 2, "p")``) points to the file, line and column it came from, so any later error -
pydantic's, a transform's, a missing folder - can name the exact place to fix.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from framework.errors import Issue, RecipeError
from framework.io import FileProblem, read_text

Loc = tuple  # (file, line, column); line/column 1-based, None when unknown
Locs = dict  # key path tuple -> Loc

SET_SOURCE = "--set"
# Fields holding file paths; relative values are resolved against the folder of the file that set them
# ("*" = every list item). Data source paths are relative to data.root instead (see framework.data.readers).
_FILE_RELATIVE = [("data", "root"), ("model", "weights"), ("transforms", "train_file"), ("validation", "path"),
                  ("plugins", "*")]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `3e-4` as a float (YAML 1.1 wants `3.0e-4`; people write learning rates so)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|" 
               r"^[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?$|^[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?$|"
               r"^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def _yaml_value(text: str):
    """A --set value, read as YAML within the same limits as a recipe file."""
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        return None if node is None else _construct(loader, node, (), SET_SOURCE, {}, [0])
    except RecipeError as e:  # a place inside the value means nothing on a command line
        raise RecipeError([dataclasses.replace(i, line=None, column=None) for i in e.issues]) from None
    except RecursionError:
        raise RecipeError(Issue(f"the value is nested too deeply (more than {MAX_DEPTH} levels).", file=SET_SOURCE,
                                fix="check for runaway brackets.")) from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: Path) -> tuple[Any, Locs]:
    """Parse one YAML file safely into plain data plus a location for every key and item."""
    path = Path(path)
    try:
        text = read_text(path, MAX_RECIPE_BYTES)
    except FileProblem as e:
        if e.reason == "not found":
            raise RecipeError(Issue(f"file not found (looked for {path.resolve()}).", file=str(path),
                                    fix="check the path; relative paths start at the recipe's folder.")) from None
        raise RecipeError(Issue(f"cannot read the recipe: it {e.reason}.", file=str(path),
                                fix="give a recipe: a YAML text file (UTF-8) of at most "
                                    f"{MAX_RECIPE_BYTES >> 20} MiB.")) from None
    loader = None
    try:
        loader = _Loader(text)  # (the reader refuses control characters such as NUL here)
        node = loader.get_single_node()
        locs: Locs = {}
        data = _construct(loader, node, (), str(path), locs, [0]) if node is not None else None  # None: empty
    except RecursionError:  # thousands of nested brackets: PyYAML's composer recurses per level
        raise RecipeError(Issue(f"the YAML is nested too deeply (more than {MAX_DEPTH} levels).", file=str(path),
                                fix="a recipe is a few levels deep; check for runaway brackets.")) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise RecipeError(Issue(f"invalid YAML: {e.problem or e.context}.", file=str(path),
                                line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None,
                                fix="check indentation, colons and quotes on that line."))
    except yaml.reader.ReaderError as e:
        line = text[:e.position].count("\n") + 1
        raise RecipeError(Issue(f"invalid YAML: character {e.character!r} is not allowed in a YAML file.",
                                file=str(path), line=line, fix="remove that character (the file may be binary, "
                                "or saved with a stray control character).")) from None
    except yaml.YAMLError as e:
        raise RecipeError(Issue(f"invalid YAML: {e}.", file=str(path), fix="check the YAML syntax."))
    finally:
        if loader is not None:
            loader.dispose()
    return ({} if data is None else data), locs


MAX_RECIPE_BYTES = 4 << 20  # a real recipe is a few kB
MAX_DEPTH = 50  # levels of nesting; a real recipe has fewer than 10
MAX_NODES = 20_000  # values after aliases are expanded; a real recipe has a few hundred


def _construct(loader, node, key_path: tuple, file: str, locs: Locs, count: list):
    """Plain data from a node, recording each key path's location. Aliases are expanded, within limits: a few
    hundred bytes of nested aliases would otherwise expand to billions of values (or to itself, forever)."""
    count[0] += 1
    line, column = node.start_mark.line + 1, node.start_mark.column + 1
    if count[0] > MAX_NODES or len(key_path) > MAX_DEPTH:
        what = f"more than {MAX_NODES:,} values" if count[0] > MAX_NODES else f"more than {MAX_DEPTH} levels"
        raise RecipeError(Issue(f"the YAML expands to {what} (aliases such as *name repeat what they point to).",
                                file=file, line=line, column=column,
                                fix="write the values out, or use fewer nested aliases; a recipe that points to "
                                    "itself (&x [*x]) never ends."))
    locs[key_path] = (file, line, column)
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for k_node, v_node in node.value:
            if not isinstance(k_node, yaml.ScalarNode):
                raise RecipeError(Issue("a mapping key must be a plain word.", file=file,
                                        line=k_node.start_mark.line + 1, column=k_node.start_mark.column + 1))
            key = loader.construct_object(k_node, deep=True)
            if key in out:
                raise RecipeError(Issue(f"key {key!r} appears twice in the same mapping.", file=file,
                                        line=k_node.start_mark.line + 1, column=k_node.start_mark.column + 1,
                                        fix="keep one of them."))
            sub = key_path + (key,)
            out[key] = _construct(loader, v_node, sub, file, locs, count)
            locs[sub] = (file, k_node.start_mark.line + 1, k_node.start_mark.column + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(loader, n, key_path + (i,), file, locs, count) for i, n in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


_KINDS = ("type", "name")  # the tag of a closed choice: split policy, optimizer, scheduler, loss


def _replaces(base: Any, over: Any) -> bool:
    """Does `over` replace `base` whole? Yes unless both are mappings of the same kind: a mapping whose `type` or
    `name` differs (another split policy, optimizer or loss) does not inherit the other kind's options."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return True
    return any(k in base and k in over and base[k] != over[k] for k in _KINDS)


def deep_merge(base: Any, over: Any) -> Any:
    """Mappings merge key by key, unless their `type` / `name` differ; everything else (lists included) is
    replaced by `over`."""
    if _replaces(base, over):
        return copy.deepcopy(over)
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(base[k], v) if k in base else copy.deepcopy(v)
    return out


def _merge_locs(base: Locs, over: Locs, over_data: Any, base_data: Any) -> Locs:
    """Locations after deep_merge: a replaced value drops the base's locations below it. Linear in the number of
    locations (each path is checked against the replaced ones by its own prefixes)."""
    replaced = {path for path in over if path and _replaces(_get(base_data, path), _get(over_data, path))}
    out = {p: loc for p, loc in base.items() if not any(p[:k] in replaced for k in range(1, len(p)))}
    out.update(over)
    return out


def _get(data: Any, path: tuple, default=None):
    for k in path:
        if isinstance(data, dict) and k in data:
            data = data[k]
        elif isinstance(data, list) and isinstance(k, int) and -len(data) <= k < len(data):
            data = data[k]
        else:
            return default
    return data


def _with_extends(path: Path, chain: tuple) -> tuple[dict, Locs]:
    path = Path(path).resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in chain + (path,))
        raise RecipeError(Issue(f"`extends` forms a cycle: {cycle}.", field="extends", file=str(chain[-1]),
                                fix="remove one of the `extends` lines so the chain ends."))
    data, locs = read_yaml(path)
    if not isinstance(data, dict):
        raise RecipeError(Issue(f"a recipe must be a mapping of sections, got {type(data).__name__}.",
                                file=str(path), line=1, fix="start the file with sections such as `data:`."))
    _resolve_file_paths(data, locs, path.parent)
    parents = data.pop("extends", None)
    if parents is None:
        return data, locs
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        file, line, col = locs[("extends",)]
        raise RecipeError(Issue("`extends` must be a file name or a list of file names.", field="extends",
                                file=file, line=line, column=col, fix="write `extends: base.yaml`."))
    merged: dict = {}
    merged_locs: Locs = {}
    for i, parent in enumerate(parents):
        ppath = (path.parent / parent)
        if not ppath.exists():
            file, line, col = locs.get(("extends", i), locs[("extends",)])
            raise RecipeError(Issue(f"the base recipe {parent!r} does not exist (looked for {ppath.resolve()}).",
                                    field="extends", file=file, line=line, column=col,
                                    fix="give the base's path relative to this recipe's folder."))
        pdata, plocs = _with_extends(ppath, chain + (path,))
        merged_locs = _merge_locs(merged_locs, plocs, pdata, merged)
        merged = deep_merge(merged, pdata)
    locs = {k: v for k, v in locs.items() if not (k and k[0] == "extends")}
    return deep_merge(merged, data), _merge_locs(merged_locs, locs, data, merged)


def _resolve_file_paths(data: dict, locs: Locs, base: Path, specs: list | None = None) -> None:
    """Turn relative file paths into absolute ones, relative to the folder of the file that wrote them."""
    for spec in _FILE_RELATIVE if specs is None else specs:
        parent = _get(data, spec[:-1])
        if spec[-1] == "*":
            if isinstance(parent, list):
                for i, v in enumerate(parent):
                    if isinstance(v, str) and _looks_like_path(v):
                        parent[i] = str((base / v).resolve())
        elif isinstance(parent, dict) and isinstance(parent.get(spec[-1]), str):
            value = parent[spec[-1]]
            if not (spec == ("data", "root") and value.startswith("~")) and not _is_name(spec, value):
                parent[spec[-1]] = str((base / Path(value).expanduser()).resolve())


def _resolve_file_paths_below(data: dict, path: tuple, base: Path) -> None:
    """The file paths inside a value set whole on the command line, made absolute against `base` (the working
    directory), as a path set by itself is: a run folder's resolved recipe must not hold a relative path, which
    would be read back against the run folder."""
    _resolve_file_paths(data, {}, base, [s for s in _FILE_RELATIVE if len(s) > len(path) and s[:len(path)] == path])


def _looks_like_path(value: str) -> bool:
    return "/" in value or value.endswith(".py")


def _is_name(spec: tuple, value: str) -> bool:
    """`model.weights: imagenet` names a weight source; a file is written with a suffix or a folder (./imagenet)."""
    return spec == ("model", "weights") and re.fullmatch(r"[A-Za-z0-9_-]+", value) is not None


def parse_override(text: str) -> tuple[tuple, Any]:
    """`train.lr=3e-4` -> (("train", "lr"), 0.0003). Values are YAML scalars or flow lists/maps."""
    if "=" not in text:
        raise RecipeError(Issue(f"override {text!r} has no '='.", field=text, file=SET_SOURCE,
                                fix="write --set section.key=value, e.g. --set train.lr=3e-4."))
    key, _, raw = text.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise RecipeError(Issue(f"override {text!r} has an empty key.", file=SET_SOURCE,
                                fix="write --set section.key=value."))
    try:
        value = _yaml_value(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(Issue(f"cannot parse the value {raw!r}: {e}.", field=key, file=SET_SOURCE,
                                fix="quote strings with special characters."))
    path = tuple(int(p) if p.lstrip("-").isdigit() else p for p in parts)
    return path, value


def apply_overrides(data: dict, locs: Locs, overrides: list[str]) -> None:
    """Apply `--set` overrides in place; their location is the command line."""
    for text in overrides:
        path, value = parse_override(text)
        target = data
        for i, k in enumerate(path[:-1]):
            nxt = path[i + 1]
            if isinstance(target, list):
                if not isinstance(k, int) or not -len(target) <= k < len(target):
                    raise RecipeError(Issue(f"index {k} is out of range in --set {text}.", field=_dotted(path),
                                            file=SET_SOURCE, fix=f"use an index below {len(target)}."))
                target = target[k]
            else:
                if not isinstance(target.get(k), (dict, list)):
                    target[k] = [] if isinstance(nxt, int) else {}
                target = target[k]
        last = path[-1]
        if isinstance(target, list):
            if not isinstance(last, int) or not -len(target) <= last < len(target):
                raise RecipeError(Issue(f"index {last} is out of range in --set {text}.", field=_dotted(path),
                                        file=SET_SOURCE, fix=f"use an index below {len(target)}."))
        target[last] = value
        for p in [p for p in locs if p[: len(path)] == path]:
            del locs[p]
        locs[path] = (SET_SOURCE, None, None)
        if path in [s for s in _FILE_RELATIVE] or (path[:-1] + ("*",)) in _FILE_RELATIVE:
            if isinstance(value, str) and not _is_name(path, value):
                target[last] = str(Path(value).expanduser().resolve())
        elif isinstance(value, (dict, list)):  # a whole section (--set "validation={type: file, path: x.csv}")
            _resolve_file_paths_below(data, path, Path.cwd())


def load_dict(path: str | Path, overrides: list[str] | None = None) -> tuple[dict, Locs]:
    """The merged recipe as plain data with locations, before validation."""
    data, locs = _with_extends(Path(path), ())
    apply_overrides(data, locs, list(overrides or []))
    _absolute_default_root(data)
    return data, locs


def _absolute_default_root(data: dict) -> None:
    """A recipe that writes no data.root reads its data from the working directory: recorded as that absolute folder,
    so the resolved recipe a run folder keeps (and resumes from) means the same folder wherever it is read."""
    section = data.get("data")
    if isinstance(section, dict) and "root" not in section:
        section["root"] = str(Path.cwd())


def _dotted(path: tuple) -> str:
    out = ""
    for k in path:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out


def locate(locs: Locs, path: tuple, default_file: str | None = None) -> tuple[str | None, int | None, int | None]:
    """The closest known location of `path` (itself, or the nearest parent that has one)."""
    for n in range(len(path), -1, -1):
        if path[:n] in locs:
            return locs[path[:n]]
    return default_file, None, None


def issue_at(locs: Locs, path: tuple, message: str, fix: str = "", file: str | None = None) -> Issue:
    """An Issue placed at the recipe location of `path`."""
    f, line, col = locate(locs, path, file)
    return Issue(message, field=_dotted(path), file=f, line=line, column=col, fix=fix)


def field_path(path: tuple) -> str:
    return _dotted(path)
