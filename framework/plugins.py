"""Load plugins: files or modules a recipe names (`plugins: [plugins/face_crop.py, mypackage.crops]`) and
installed packages that declare the entry-point group `recipe.plugins`. Plugin code runs only when named.

A plugin is a plain Python module that registers things with the registries in `framework.registry`.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
from pathlib import Path

from framework.errors import Issue, RecipeError
from framework.registry import RegistryError

ENTRY_POINT_GROUP = "recipe.plugins"


class PluginError(RecipeError):
    """A plugin failed to import or to register."""


def _failure(e: BaseException, path: str | None) -> tuple[int | None, str]:
    """The line of the plugin file where `e` happened, and the code on it."""
    if isinstance(e, SyntaxError) and e.filename and (path is None or Path(e.filename) == Path(path)):
        return e.lineno, (e.text or "").strip()
    frames = [f for f in traceback.extract_tb(e.__traceback__) if path and Path(f.filename) == Path(path)]
    if frames:
        return frames[-1].lineno, (frames[-1].line or "").strip()
    return None, ""


def _is_file(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec


def module_name(spec: str) -> str:
    """The module a plugin spec (a .py file path or a module name) is imported as."""
    if not _is_file(spec):
        return spec
    path = str(Path(spec).resolve())
    return f"recipe_plugin_{Path(spec).stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"


_LOADED_FILES: set[str] = set()  # file names of the plugin files imported in this process


def is_loaded(spec: str) -> bool:
    """Whether this plugin has been imported in this process (by a recipe, or by the user's --plugin): the same
    module, or a plugin file of the same name (a run folder made elsewhere names the file where it was then)."""
    return module_name(spec) in sys.modules or (_is_file(spec) and Path(spec).name in _LOADED_FILES)


def load_plugin(spec: str, where: Issue | None = None) -> str:
    """Import one plugin (a .py file path or a module name); returns the module name."""
    is_file = _is_file(spec)
    path = str(Path(spec).resolve()) if is_file else None
    if is_file and not Path(spec).is_file():
        raise PluginError(_issue(where, f"plugin file not found: {spec}.",
                                 "give the path relative to the recipe, or a module name."))
    name = module_name(spec)
    if name in sys.modules:
        return name
    try:
        if is_file:
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except RegistryError as e:
        sys.modules.pop(name, None)
        raise PluginError(_issue(where, f"plugin {spec}: {e}", "rename the plugin's entry.")) from None
    except ModuleNotFoundError as e:
        sys.modules.pop(name, None)
        if not is_file and e.name == spec.split(".")[0]:
            raise PluginError(_issue(where, f"plugin module {spec!r} is not installed.",
                                     "install it, or give a .py file path.")) from None
        line, code = _failure(e, path)
        raise PluginError(_issue(where, f"plugin {spec}{f' line {line}' if line else ''} failed to import "
                                        f"{e.name!r}: {e}." + (f" The line: `{code}`." if code else ""),
                                 f"install {e.name} or remove that import.")) from None
    except Exception as e:  # noqa: BLE001 - any plugin failure becomes one clear error
        sys.modules.pop(name, None)
        line, code = _failure(e, path)
        raise PluginError(_issue(where, f"plugin {spec}{f' line {line}' if line else ''} raised "
                                        f"{type(e).__name__}: {e}." + (f" The line: `{code}`." if code else ""),
                                 "fix the plugin; it runs when a recipe names it.")) from None
    if is_file:
        _LOADED_FILES.add(Path(spec).name)
    return name


def _issue(where: Issue | None, message: str, fix: str) -> Issue:
    if where is None:
        return Issue(message, fix=fix)
    return Issue(message, field=where.field, file=where.file, line=where.line, column=where.column, fix=fix)


def load_entry_points() -> list[str]:
    """Import every installed package's `recipe.plugins` entry point (a module is imported once)."""
    from importlib.metadata import entry_points

    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        origin = f"entry point {ep.name} ({ep.value})"
        try:
            ep.load()
        except RegistryError as e:
            raise PluginError(Issue(f"{origin}: {e}", fix="rename the plugin's entry.")) from None
        except Exception as e:  # noqa: BLE001
            raise PluginError(Issue(f"{origin} failed to load: {type(e).__name__}: {e}.",
                                    fix=f"fix or uninstall the package that provides {ep.value}.")) from None
        names.append(ep.value)
    return names
