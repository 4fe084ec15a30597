"""Sweeps: every combination of a grid of recipe overrides, one normal run after another.

Run names: `<prefix>-<key>=<value>-...` where <prefix> defaults to the recipe's file name (without .yaml), <key> is
the last part of each grid key (`model.backbone` -> `backbone`) and values are written as given, with characters
other than letters, digits, `.`, `_` and `-` replaced by `_` (none at either end): `[96, 128]` -> `96_128`;
e.g. `hard_aug-backbone=resnet18-image_size=128`.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

from framework.errors import Issue, RecipeError


def split_values(text: str) -> list[str]:
    """`a,b,[1, 2]` -> ['a', 'b', '[1, 2]']: commas inside brackets stay."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse_grid(grid: list[str]) -> list[tuple[str, list[str]]]:
    axes = []
    for g in grid:
        key, sep, values = g.partition("=")
        if not sep or not key.strip() or not split_values(values):
            raise RecipeError(Issue(f"--grid {g!r} is not KEY=V1,V2,...", field="--grid",
                                    fix="e.g. --grid model.backbone=resnet18,efficientnet_b0"))
        axes.append((key.strip(), split_values(values)))
    return axes


def _safe(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", value).strip("_") or "_"


def expand(recipes: list[str | Path], grid: list[str], prefix: str | None = None) -> list[dict]:
    """Every (recipe, overrides, name) of the sweep, in order."""
    axes = parse_grid(grid)
    plan = []
    for recipe in recipes:
        stem = prefix or Path(recipe).stem
        if len(recipes) > 1 and prefix:
            stem = f"{prefix}-{Path(recipe).stem}"
        for combo in itertools.product(*(values for _, values in axes)) if axes else [()]:
            overrides = [f"{key}={v}" for (key, _), v in zip(axes, combo)]
            name = "-".join([stem] + [f"{key.split('.')[-1]}={_safe(v)}" for (key, _), v in zip(axes, combo)])
            plan.append({"recipe": str(recipe), "overrides": overrides, "name": name})
    return plan


def run_sweep(plan: list[dict], run_member, base_overrides: list[str] = (), log=print) -> list[dict]:
    """Run each member with `run_member(recipe, overrides, name=, log=)` (framework.api.run_or_continue); a failed
    member is recorded and the sweep goes on. A stop (Ctrl-C, SIGTERM) stops the whole sweep: the interrupted
    member keeps its resumable checkpoint, and the members not started are named. The same sweep run again
    completes itself: finished members are kept, the interrupted one is resumed."""
    from framework.errors import Interrupted

    results = []
    for i, member in enumerate(plan, 1):
        log(f"[{i}/{len(plan)}] {member['name']}: {' '.join(member['overrides']) or '(no overrides)'}")
        try:
            run_dir = run_member(member["recipe"], list(base_overrides) + member["overrides"],
                                 name=member["name"], log=log)
            results.append({**member, "status": "finished", "run_dir": run_dir})
        except Interrupted:
            left = [m["name"] for m in plan[i:]]
            if left:
                log(f"sweep stopped; not started: {', '.join(left)}")
            raise
        except RecipeError as e:
            log(f"failed: {e.format()}")
            results.append({**member, "status": "failed", "error": e.format()})
        except Exception as e:  # noqa: BLE001 - record any failure and go on with the next member
            log(f"failed: {type(e).__name__}: {e}")
            results.append({**member, "status": "failed", "error": f"{type(e).__name__}: {e}"})
    return results
