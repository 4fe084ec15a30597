"""The model card written beside an export (MODEL_CARD.md): what the model is, what it was trained and validated
on, how well it did per class, and what it should not be used for, from the run folder's own records."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from framework.engine.metrics import per_task
from framework.folders import RunFolder


def model_card(run, info: dict) -> str:
    """Markdown: model, recipe, data per source, split and leakage audit, per-class metrics at the kept epoch
    (and out of fold for a k-fold run), calibration and decision rule, intended use and limits, data licences."""
    folder = RunFolder(run.run_dir)
    summary = folder.summary_or_none() or {}
    rows = folder.split_rows() if folder.file(folder.SPLIT).exists() else []
    parts = [_header(run, info, summary), _recipe(run, summary), _data(run, rows), _split(run, rows),
             _metrics(run, summary), _out_of_fold(run), _rules(run, info), _limits(run, rows, summary),
             _licences(run, rows)]
    return "\n".join(p for p in parts if p)


def _read_json(path: Path):
    """A NAME-cv.json beside the run (None when missing or unreadable: the card then has no out-of-fold part)."""
    from framework.io import FileProblem, read_text

    try:
        return json.loads(read_text(path))
    except (FileProblem, ValueError):
        return None


def _header(run, info: dict, summary: dict) -> str:
    src, check = info["source_run"], info["check"]
    lines = [f"# Model card: {run.name}", ""]
    if not info["finished"]:
        lines += [f"> **Unfinished run.** Status `{src['status']}`, {src['epochs_done']} of {src['epochs']} epochs "
                  f"done: this is the best checkpoint so far (epoch {src['best_epoch']}), not a finished model.", ""]
    h, w = info["input"]["size"]
    lines += ["## Model", f"- Backbone `{run.recipe.model.backbone}`, {info['format']} file `{info['file']}`, "
              f"checkpoint `{src['checkpoint']}` (epoch {src['best_epoch']}) of run `{src['name']}`.",
              f"- Input: uint8 RGB images (N, 3, {h}, {w}), normalised inside the model; the recipe's resize stage "
              f"(`{run.recipe.transforms.resize.mode}`) comes first. Test-time augmentation inside: {info['tta']}.",
              f"- Outputs: {', '.join(f'`{o}`' for o in info['outputs'])}.",
              f"- Export check: {check['on']}, largest absolute difference to the run's model "
              f"{check['max_abs_difference']:.2e} (tolerance {check['tolerance']:g}).", ""]
    return "\n".join(lines)


def _recipe(run, summary: dict) -> str:
    overrides = summary.get("overrides") or []
    lines = ["## Training recipe", f"- Recipe `{summary.get('recipe', '?')}`"
             + (f", overrides: {', '.join(f'`{o}`' for o in overrides)}" if overrides else ", no overrides") + ".",
             f"- Notes: {run.recipe.notes or '-'}",
             f"- {run.recipe.train.epochs} epochs, batch {run.recipe.train.batch_size}, optimizer "
             f"{run.recipe.train.optimizer.name} lr {run.recipe.train.optimizer.lr:g}, loss {run.recipe.train.loss.name}; "
             f"weights: {run.recipe.model.weights or ('timm pretrained' if run.recipe.model.pretrained else 'none (from scratch)')}.",
             "- The whole recipe, as trained: `recipe.resolved.yaml`.", ""]
    return "\n".join(lines)


def _data(run, rows: list[dict]) -> str:
    lines = ["## Data (images per class: train / validation)"]
    for task, lab in run.labels.items():
        counts = Counter((r["source"], r["split"], r.get(task, "")) for r in rows)
        sources = sorted({r["source"] for r in rows})
        lines += ["", f"Task `{task}`:", "", "| source | " + " | ".join(lab.classes) + " |",
                  "|---|" + "---:|" * len(lab.classes)]
        for s in sources:
            lines.append(f"| {s} | " + " | ".join(f"{counts[(s, 'train', c)]} / {counts[(s, 'val', c)]}"
                                                  for c in lab.classes) + " |")
    left = Counter(r["split"] for r in rows)
    lines += ["", f"{left.get('unused', 0)} image(s) left out (`unused` in the run's split.csv).", ""]
    return "\n".join(lines)


def _split(run, rows: list[dict]) -> str:
    policy = run.recipe.validation.model_dump(exclude_none=True)
    sides: dict[str, set] = {}
    for r in rows:
        if r["split"] in ("train", "val") and r.get("group"):
            sides.setdefault(r["group"], set()).add(r["split"])
    both = [g for g, s in sides.items() if len(s) > 1]
    audit = ("no group (person or duplicate set) has images on both sides" if not both else
             f"{len(both)} group(s) have images on both sides, e.g. {', '.join(both[:3])}")
    return "\n".join(["## Split and leakage audit", f"- Policy: `{json.dumps(policy)}`.",
                      f"- Audit of the run's split.csv: {audit} ({len(sides)} groups).", ""])


def _metrics(run, summary: dict) -> str:
    record = RunFolder(run.run_dir).kept_record(summary.get("best_epoch"))
    if record is None:
        return "## Validation metrics\nNo epoch was validated.\n"
    lines = [f"## Validation metrics at the kept epoch ({record['epoch']})"]
    for task, scores in per_task(record["val"]).items():
        lines += _class_table(task or "label", scores)
    return "\n".join(lines + [""])


def _class_table(task: str, scores: dict) -> list[str]:
    lines = ["", f"Task `{task}`: macro-F1 {scores['macro_f1']:.3f}, accuracy {scores['accuracy']:.3f}"
             + (f", MAE {scores['mae']:.2f}" if "mae" in scores else "") + ".", "",
             "| class | precision | recall | F1 | images |", "|---|---:|---:|---:|---:|"]
    for c, m in scores.get("per_class", {}).items():
        lines.append(f"| {c} | {m.get('precision', 0):.3f} | {m.get('recall', 0):.3f} | {m.get('f1', 0):.3f} | "
                     f"{m.get('support', '?')} |")
    return lines


def _out_of_fold(run) -> str:
    """A fold run of `--all-folds`: the pooled out-of-fold figures of all folds (NAME-cv.json beside the runs)."""
    name = run.run_dir.name
    if "-fold" not in name:
        return ""
    pooled = _read_json(run.run_dir.parent / f"{name.rsplit('-fold', 1)[0]}-cv.json")
    if not isinstance(pooled, dict) or not isinstance(pooled.get("val"), dict):
        return ""
    lines = [f"## Out-of-fold metrics ({pooled.get('folds', '?')} folds pooled: every labelled image validated once, "
             "by the fold model that did not train on it)"]
    for task, scores in per_task(pooled["val"]).items():
        lines += _class_table(task or "label", scores)
    return "\n".join(lines + [""])


def _rules(run, info: dict) -> str:
    calibration = RunFolder(run.run_dir).calibration()
    lines = ["## Calibration and decision rule"]
    if isinstance(calibration, dict) and isinstance(calibration.get("questions"), dict):
        lines.append("- Calibration fitted on the validation split (bias-corrected temperature scaling, for "
                     "`--prior-shift`; the exported probabilities are not calibrated): " + "; ".join(
                         f"{q}: temperature {v.get('temperature', float('nan')):.3f}, bias "
                         f"{[round(b, 3) for b in v.get('bias', [])]}" for q, v in calibration["questions"].items()
                         if isinstance(v, dict)) + ".")
    else:
        lines.append("- No calibration stored (`recipe predict RUN --prior-shift em` fits one on the run folder); "
                     "the probabilities are the model's own.")
    if info.get("decision"):
        lines.append("- Decision rule for macro-F1 (offsets added to the log-probabilities before the argmax), used "
                     "by `recipe predict` on this folder: " + "; ".join(
                         f"{q}: {json.dumps(o)}" for q, o in info["decision"].items()) + ".")
    else:
        lines.append("- Decision rule: the argmax of the probabilities.")
    return "\n".join(lines + [""])


def _limits(run, rows: list[dict], summary: dict) -> str:
    sources = sorted({r["source"] for r in rows if r["split"] in ("train", "val")})
    record = RunFolder(run.run_dir).kept_record(summary.get("best_epoch"))
    thin = []
    for task, scores in (per_task(record["val"]).items() if record else ()):
        thin += [f"{c} ({m['support']})" for c, m in scores.get("per_class", {}).items()
                 if isinstance(m.get("support"), int) and m["support"] < 30]
    lines = ["## Intended use and known limits",
             f"- Made to answer {', '.join(f'`{q}`' for q in run.questions())} for images like those of "
             f"{', '.join(sources) or 'its training data'}, through the same resize stage. Other cameras, crops, "
             "populations or mask styles were not validated: measure on your own labelled images first "
             "(`recipe evaluate` with the run folder).",
             "- Not for decisions about individual people: the scores are averages over a validation split.",
             "- Classes with fewer than 30 validation images have wide uncertainty on every figure above: "
             + (", ".join(thin) if thin else "none") + "."]
    return "\n".join(lines + [""])


def _licences(run, rows: list[dict]) -> str:
    """Each source's licence, as the README beside its data states it (a `**License` paragraph): beside its
    manifest or folder, else above its images."""
    lines = ["## Data licences (as each source's README states them; check before shipping the model)"]
    for src in run.recipe.data.sources:
        where = getattr(src, "manifest", None) or getattr(src, "path", None) or ""
        base = Path(getattr(src, "root", None) or run.recipe.data.root)
        images = [r["path"] for r in rows if r["source"] == src.name]
        found = _licence_paragraph(base / where, base)
        if found is None and images:
            top = Path(os.path.commonpath(images[:2000]))
            found = _licence_paragraph(top, top.parent.parent)
        lines.append(f"- `{src.name}` ({where}): " + (found or "no licence statement found beside the data."))
    return "\n".join(lines + [""])


def _licence_paragraph(path: Path, base: Path) -> str | None:
    folder = path if path.is_dir() else path.parent
    for candidate in [folder, *folder.parents][:4]:
        readme = candidate / "README.md"
        if readme.is_file():
            for block in readme.read_text(encoding="utf-8", errors="replace").split("\n\n"):
                if "licen" in block.lower()[:40]:
                    return " ".join(block.split())
        if candidate == base:
            break
    return None
