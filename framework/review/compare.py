"""The experiment sheet: runs side by side, with what changed between them.

One row per run folder: name, date, status, backbone, image size, recipe, epochs, best validation scores (overall
and per task), wall time, notes, and `changed`: the recipe keys whose values differ from the baseline run.
"""
from __future__ import annotations

import csv
import html
import io
import json
import os
import re
from pathlib import Path

from framework.engine.metrics import per_task
from framework.errors import RunError
from framework.folders import RunFolder
from framework.recipe.loaded import flatten  # noqa: F401 (part of this module's interface: tests, crossval)
from framework.io import FileProblem, read_text

IGNORED_KEYS = ("output.root", "notes", "logging.progress")  # never an experimental change


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders among `paths`: each is a run folder or a folder of run folders."""
    def has_summary(d: Path) -> bool:
        return os.path.lexists(RunFolder(d).file(RunFolder.SUMMARY))

    runs = []
    for p in map(Path, paths):
        if has_summary(p):
            runs.append(p)
        elif p.is_dir():
            runs += sorted(d for d in p.iterdir() if d.is_dir() and has_summary(d))
    return runs


def damaged(run: Path) -> str | None:
    """Why a run folder cannot be put on the sheet (a truncated or hand-edited summary.json or recipe), or None."""
    folder = RunFolder(run)
    try:
        folder.summary()
        if folder.recipe_file.exists():
            folder.recipe_dict()
        folder.metrics()
    except RunError as e:
        return e.issues[0].format()
    return None


def damaged_crossval(path: Path) -> str | None:
    """Why a NAME-cv.json cannot be a row, or None."""
    try:
        result = json.loads(read_text(path))
        ok = (isinstance(result, dict) and isinstance(result.get("runs"), list) and result["runs"]
              and all(isinstance(r, str) and "/" not in r and r not in (".", "..") for r in result["runs"])
              and isinstance(result.get("val"), dict))
    except FileProblem as e:
        return f"{path} {e.reason}"
    except ValueError as e:
        return f"unreadable ({type(e).__name__})"
    return None if ok else "not the result of `recipe run --all-folds`"


def _recipe(run: Path) -> dict:
    """A run's resolved recipe, flattened; read through today's schema when it still validates, so settings added
    to the framework after the run (with their defaults) do not show up as changes."""
    from pydantic import ValidationError

    from framework.recipe.schema import Recipe

    raw = RunFolder(run).recipe_dict()
    try:
        raw = Recipe.model_validate(raw).model_dump(mode="json", exclude_none=True)
    except ValidationError:  # e.g. a plugin's loss that is not loaded here: compare the file as written
        pass
    return flatten(raw)


def changed(run_recipe: dict, base_recipe: dict) -> list[str]:
    """`key: old -> new` for every recipe key that differs (added or removed keys included). A list entry that only
    one side has (a source or an augmentation added or removed) is one item: `data.sources.1: - -> {...}`."""
    out = []
    whole = _one_sided_entries(run_recipe, base_recipe)
    done = set()
    for key in sorted(set(run_recipe) | set(base_recipe)):
        if key.startswith(IGNORED_KEYS):
            continue
        entry = next((e for e in whole if key.startswith(e + ".")), None)
        if entry is not None:
            if entry not in done:
                done.add(entry)
                a, b = _entry(base_recipe, entry), _entry(run_recipe, entry)
                out.append(f"{entry}: {_short('-' if a is None else a)} -> {_short('-' if b is None else b)}")
            continue
        a, b = base_recipe.get(key, "-"), run_recipe.get(key, "-")
        if a != b:
            out.append(f"{key}: {_short(a)} -> {_short(b)}")
    return out


def _one_sided_entries(a: dict, b: dict) -> set[str]:
    """`data.sources.1`-like list entries whose keys are all on one side only."""
    def entries(flat):
        return {m.group(1) for k in flat if (m := re.match(r"(.*?\.\d+)\.", k))}
    return entries(a) ^ entries(b)


def _entry(flat: dict, entry: str):
    """A list entry by its `name` (a source's or a transform's), else its fields; None when absent."""
    fields = {k[len(entry) + 1:]: v for k, v in flat.items() if k.startswith(entry + ".")}
    return fields.get("name", fields) if fields else None


def _short(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 40 else text[:37] + "..."


def kept_classes(run: Path, best_epoch: int | None) -> list[str]:
    """Lines for the end of a run: every class's F1 (and validation count) at the kept epoch, and a warning for a
    class none of whose validation images were found, which the overall accuracy hides."""
    chosen = RunFolder(run).kept_record(best_epoch)
    if chosen is None:
        return []
    lines = []
    for task, sc in per_task(chosen["val"]).items():
        prefix = f"{task}: " if task else ""
        per = {c: m for c, m in sc.get("per_class", {}).items() if "f1" in m}
        if not per:
            continue
        cells = ", ".join(f"{c} {m['f1']:.3f} ({m.get('support', '?')})" for c, m in per.items())
        lines.append(f"{prefix}F1 per class at epoch {chosen['epoch']} (validation images): {cells}")
        lost = [f"{c} ({m['support']})" for c, m in per.items() if m.get("support") and m.get("recall") == 0]
        if lost:
            lines.append(f"warning: {prefix}none of the validation images of {', '.join(lost)} was found (F1 0), "
                         f"though accuracy is {sc['accuracy']:.3f}. For a rare class see `train.sampler: "
                         "balanced` and `train.loss.class_weights: auto`.")
    return lines


def _best_scores(run: Path, best_epoch: int | None) -> dict[str, float]:
    """Validation metrics of the epoch whose checkpoint the run kept as `best` (else the last validated one), with
    every class's F1 (`val/f1/<class>`, per task `val/<task>/f1/<class>`): the figures of the model one would ship,
    all from the same epoch, never the best of each metric over different epochs."""
    chosen = RunFolder(run).kept_record(best_epoch)
    return {} if chosen is None else {"best_epoch": chosen["epoch"]} | _val_scores(chosen["val"])


def _val_scores(val: dict) -> dict[str, float]:
    """`val/...` columns of one validation record: overall, per task and every class's F1."""
    from framework.engine.metrics import flat_metrics

    scores = {k: v for k, v in flat_metrics({"lr": None, "val": val}).items()
              if k.startswith("val/") and not k.endswith("threshold")}
    for task, sc in per_task(val).items():
        prefix = f"{task}/" if task else ""
        for c, m in sc.get("per_class", {}).items():
            if "f1" in m:
                scores[f"val/{prefix}f1/{c}"] = m["f1"]
    return scores


def find_crossvals(paths: list[str | Path]) -> list[Path]:
    """Cross-validation results among `paths` (`NAME-cv.json`, written by `recipe run --all-folds`)."""
    found = []
    for p in map(Path, paths):
        if p.is_file() and p.name.endswith("-cv.json"):
            found.append(p)
        elif p.is_dir():
            found += sorted(p.glob("*-cv.json"))
    return found


def sheet(runs: list[Path], baseline: Path | None = None, sort: str | None = None,
          crossvals: list[Path] = ()) -> tuple[list[str], list[dict]]:
    """Columns and rows of the experiment sheet: one row per run, and one per cross-validation (its folds pooled,
    described by its first fold's run)."""
    entries = [(run, run.name, None) for run in runs] + _crossval_entries(crossvals)
    if not entries:
        return [], []
    summaries = {e[0]: RunFolder(e[0]).summary() for e in entries}
    recipes = {r: _recipe(r) if RunFolder(r).is_run() else {} for r in summaries}
    if baseline is not None and baseline not in recipes:
        recipes[baseline] = _recipe(baseline) if RunFolder(baseline).is_run() else {}
    rows, metric_cols = [], []
    for run, name, pooled in entries:
        s, recipe = summaries[run], recipes[run]
        base = baseline or _nearest_earlier(run, summaries, recipes)
        scores = _best_scores(run, s.get("best_epoch")) if pooled is None else _val_scores(pooled["val"])
        for k in scores:
            if k not in metric_cols:
                metric_cols.append(k)
        rows.append({
            "run": name, "date": s.get("started", "")[:16].replace("T", " "),
            "status": s.get("status", "?") + (" (fast dev run)" if s.get("fast_dev_run") else ""),
            "backbone": s.get("backbone", recipe.get("model.backbone", "")), "form": _form(recipe),
            "image_size": "x".join(map(str, s.get("image_size", []))) or str(recipe.get("transforms.image_size", "")),
            "recipe": Path(s.get("recipe", "")).name, "epochs": f"{s.get('epochs_done', 0)}/{recipe.get('train.epochs', '?')}",
            **{k: scores.get(k) for k in metric_cols},
            "wall_s": s.get("wall_seconds") if pooled is None else pooled.get("wall_seconds"),
            "notes": _notes(s),
            "changed": _changed_cell(run, pooled, base, baseline is not None, recipes),
        })
    order = {k: i for i, k in enumerate(metric_cols)}  # per-class columns keep the class order
    metric_cols = sorted(metric_cols, key=lambda k: (k != "best_epoch", "/f1/" in k, k != CONTEST_COLUMN, k.count("/"),
                                                     k != "val/macro_f1", order[k] if "/f1/" in k else k))
    cols = ["run", "date", "status", "backbone", "form", "image_size", "recipe", "epochs", *metric_cols, "wall_s", "notes",
            "changed"]
    for r in rows:
        for k in metric_cols:
            r.setdefault(k, None)
    key = sort or _default_sort(rows, metric_cols)
    if key:  # fast dev runs last: their figures mean nothing
        rows.sort(key=lambda r: ("fast dev" in r["status"], r.get(key) is None,
                                 -(r.get(key) or 0) if "loss" not in key else (r.get(key) or 0)))
    return cols, rows


CONTEST_COLUMN = "val/composite/macro_f1"  # the composite label's macro-F1 (the contest's 18 classes), for every form


def _default_sort(rows: list[dict], metric_cols: list[str]) -> str | None:
    """The composite label's macro-F1 when every real run answers it (a composite head, heads whose classes
    combine, pooled folds of either: the contest's metric, comparable across forms), else the overall macro-F1."""
    real = [r for r in rows if "fast dev" not in r["status"]] or rows
    if CONTEST_COLUMN in metric_cols and all(r.get(CONTEST_COLUMN) is not None for r in real):
        return CONTEST_COLUMN
    return "val/macro_f1" if "val/macro_f1" in metric_cols else None


def _form(recipe: dict) -> str:
    """How the run answers: one composite head (its parts), one head per task, or one head."""
    parts = list(dict.fromkeys(k.split(".")[3] for k in recipe if k.startswith("data.target.composite.")))
    if parts:
        return "composite: " + " x ".join(parts)
    tasks = list(dict.fromkeys(k.split(".")[1] for k in recipe if k.startswith("tasks.")))
    return f"{len(tasks)} heads" if len(tasks) > 1 else "one head"


def _crossval_entries(crossvals: list[Path]) -> list[tuple]:
    """(first fold's run, row name, pooled result) of each readable cross-validation."""
    out = []
    for path in crossvals:
        result = json.loads(read_text(path))
        first = path.parent / result["runs"][0]
        if RunFolder(first).file(RunFolder.SUMMARY).is_file() and not damaged(first):
            out.append((first, f"{path.name[:-len('.json')]} ({result['folds']} folds pooled)", result))
    return out


def _changed_cell(run: Path, pooled, base: Path | None, explicit: bool, recipes: dict) -> str:
    """What a row's recipe changed from its base (`vs NAME: ...` when the base was found, not given)."""
    if (base is None or run == base) and pooled is None:
        return "baseline"
    diff = [] if base is None else changed(recipes[run], recipes[base])
    if pooled is not None:  # the pooled row stands for every fold
        diff = [d for d in diff if not d.startswith("validation.fold:")]
    if base is not None and not explicit and base != run:
        return f"vs {base.name}: " + "; ".join(diff) if diff else f"as {base.name}"
    return "; ".join(diff)


def _nearest_earlier(run: Path, summaries: dict, recipes: dict) -> Path | None:
    """The run started before `run` whose recipe differs from its in the fewest keys (the experiment it most
    likely changed), or None for the first run: every row then says what it changed from its closest parent,
    not from one fixed baseline that other recipes differ from in 40 keys."""
    def when(r):  # runs started in the same second (a fast sweep) are ordered by name
        return summaries[r].get("started", ""), r.name

    earlier = [r for r in summaries if when(r) < when(run)]
    if not earlier:
        return None
    return min(earlier, key=lambda r: (len(changed(recipes[run], recipes[r])), when(r)))


def _notes(summary: dict) -> str:
    """The recipe's notes, then the command-line overrides the run was started with: a sweep over backbones from a
    recipe whose notes name its backbone must not read as if every run had that one."""
    overrides = summary.get("overrides") or []
    tail = f"[--set {' '.join(overrides)}]" if overrides else ""
    return " ".join(part for part in (summary.get("notes") or "", tail) if part)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def render(cols: list[str], rows: list[dict], fmt: str = "table") -> str:
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        w.writerows([[("" if r[c] is None else r[c]) for c in cols] for r in rows])
        return buf.getvalue()
    if fmt == "md":
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(r[c]).replace("|", "\\|") for c in cols) + " |" for r in rows]
        return "\n".join(lines) + "\n"
    if fmt == "html":
        return _html(cols, rows)
    widths = {c: max(len(c), *(len(_cell(r[c])) for r in rows)) if rows else len(c) for c in cols}
    widths["changed"] = len("changed")  # the last column is free text: no padding
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(_cell(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _html(cols: list[str], rows: list[dict]) -> str:
    head = "".join(f"<th onclick='sortBy({i})'>{html.escape(c)}</th>" for i, c in enumerate(cols))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r[c]))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>recipe: experiment sheet</title>
<style>body{{font:14px sans-serif;margin:1em}}table{{border-collapse:collapse}}th,td{{border:1px solid #ccc;
padding:3px 6px;text-align:left}}th{{cursor:pointer;background:#eee}}tr:nth-child(even){{background:#fafafa}}</style>
</head><body><h2>Experiment sheet</h2><p>Click a column to sort.</p><table id="t"><thead><tr>{head}</tr></thead>
<tbody>{body}</tbody></table><script>
let dir = {{}};
function sortBy(i) {{
  const tb = document.querySelector('#t tbody'), rows = [...tb.rows];
  dir[i] = -(dir[i] || -1);
  const val = r => {{ const t = r.cells[i].textContent, n = parseFloat(t); return isNaN(n) ? t : n; }};
  rows.sort((a, b) => {{ const x = val(a), y = val(b); return (x > y ? 1 : x < y ? -1 : 0) * dir[i]; }});
  rows.forEach(r => tb.appendChild(r));
}}
</script></body></html>
"""
