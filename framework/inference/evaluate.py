"""Evaluate a trained run on labelled data it may never have seen: per-task report, confusion matrices, the class
distribution, and how well the test set's class priors can be estimated (EM) and used."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from framework.folders import RunFolder
from framework.errors import FieldError, RunError, Issue


def _labelled_rows(run, recipe_data: str | Path | None, csv_file: str | Path | None):
    """Rows of a labelled set (a recipe's data, a CSV, or neither: the run's own validation split), labelled with
    the run's own task definitions and classes."""
    from framework.build import label_rows
    from framework.data.readers import read_sources
    from framework.recipe.loaded import load_recipe
    from framework.tasks import head_class

    where = None
    if recipe_data is not None:
        where = load_recipe(recipe_data)
        read = lambda: read_sources(where.recipe.data)  # noqa: E731
    elif csv_file is not None:
        read = lambda: read_sources(_csv_data(run, csv_file))  # noqa: E731
    else:
        read = lambda: own_split(run)  # noqa: E731
    specs = {task: head_class(spec.kind).reading_spec(spec, run.labels[task])
             for task, spec in run.recipe.task_specs().items()}
    try:
        rows, outside = _within_classes(_with_missing_columns(read(), specs), specs)
        return (*label_rows(rows, specs, "drop", named=run.recipe.tasks is not None), outside)
    except FieldError as e:
        if where is not None:
            raise where.located(e) from None
        raise RunError([Issue(m, field=".".join(map(str, p)), file=str(csv_file or RunFolder(run.run_dir).file(RunFolder.SPLIT)), fix=f)
                        for p, m, f in e.items]) from None


def _with_missing_columns(rows: list[dict], specs: dict) -> list[dict]:
    """With several tasks, a column no row has (a mask-only set for a mask + gender + age model) means no labels for
    that task, as in training: it is added empty, and that task is not scored."""
    if len(specs) < 2:
        return rows
    columns = {s.column for spec in specs.values() for s in (spec.composite or {"": spec}).values() if s.column}
    missing = [c for c in columns if not any(c in r for r in rows)]
    return [r | dict.fromkeys(missing, "") for r in rows] if missing else rows


def _csv_data(run, csv_file):
    """The user's own CSV as a data section (its face boxes when the run crops to faces)."""
    from framework.inference.run import box_columns_in
    from framework.recipe.schema import DataSection

    csv_path = Path(csv_file).resolve()
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        boxes = box_columns_in(run, next(csv.reader(f), []))
    source = {"type": "csv", "name": "eval", "manifest": csv_path.name, "box_columns": boxes,
              "allow_outside_root": True}  # the user's own CSV, named on the command line
    return DataSection(root=str(csv_path.parent), sources=[source])


def own_split(run) -> list[dict]:
    """The run's validation rows from its split.csv, as a reader gives rows: each task's label in its column, and
    for a task cut from a number (age) the number itself, so that moved `bins` re-band it; the data's face boxes."""
    from framework.inference.run import data_boxes, split_rows

    known = data_boxes(run) if run.recipe.transforms.resize.face_margin is not None else {}
    rows = []
    for r in split_rows(run, "val"):
        row = {"path": r["path"], "source": r["source"], "group": r["group"]}
        for task, spec in run.recipe.task_specs().items():
            if spec.composite:  # each part's source value: a banded part's number (age), else its class
                row.update({part.column: r.get(f"{name}_value") or r.get(name, "") if part.bins is not None
                            else r.get(name, "") for name, part in spec.composite.items()})
            elif spec.bins is not None and r.get(f"{task}_value", ""):
                row[spec.column] = r[f"{task}_value"]
            else:
                row[spec.column] = r.get(task, "")
        box = known.get(str(Path(r["path"]).resolve()))
        rows.append(row | ({"box": box} if box else {}))
    return rows


def _within_classes(rows: list[dict], specs: dict) -> tuple[list[dict], dict[str, int]]:
    """Rows whose labels are classes the run knows, and how many images of each other label were left out (a
    two-class model scored on a three-class set is scored on the two classes it has)."""
    from framework.data.labels import label_value

    outside: dict[str, int] = {}
    keep = []
    plain = [s for s in specs.values() if s.composite is None and s.bins is None and s.classes]
    for r in rows:
        unknown = None
        for spec in plain:
            value = label_value(r, spec, (), lenient=True)
            if value is not None and value not in spec.classes:
                unknown = value
        if unknown is None:
            keep.append(r)
        else:
            outside[unknown] = outside.get(unknown, 0) + 1
    return keep, outside


def evaluate(run: str | Path, recipe_data: str | Path | None = None, csv_file: str | Path | None = None,
             out: str | Path | None = None, tta: str | None = None, overrides: list[str] | tuple = ()) -> dict:
    """Metrics of a trained run on a labelled set (data it may never have seen): per-task report, confusion
    matrix PNGs and the predicted vs true class distribution, written to `out`."""
    from framework.engine.metrics import summarize, task_scores
    from framework.inference.decision import apply
    from framework.inference.predict import predict_tasks, questions_of
    from framework.inference.run import load_run
    from framework.io import atomic_write_text, write_json

    loaded = load_run(run, overrides=overrides)
    rows, ys, labels, dropped, outside = _labelled_rows(loaded, recipe_data, csv_file)
    paths = [r["path"] for r in rows]
    pred = predict_tasks(loaded, paths, tta, [r.get("box") for r in rows], progress=True)
    task_probs, ok, failures = pred.probs, pred.ok, pred.failures
    y_true = np.array([[ys[t][i] for t in loaded.labels] for i in ok]).reshape(len(ok), len(loaded.labels))
    picks, rule = apply(loaded, {t: task_probs[t] for t in loaded.labels})  # the run's decision rule, if any
    y_pred = np.stack([picks[t] for t in loaded.labels], axis=1)
    result = summarize(y_true, y_pred, labels)
    data = recipe_data or csv_file
    name = Path(data).stem if data else "its validation split"
    out = Path(out) if out else loaded.run_dir / "evaluations" / (default_folder(data) if data else "validation")
    out.mkdir(parents=True, exist_ok=True)
    parts = task_scores(result, name=next(iter(loaded.labels)))
    if "composite" in result:
        parts["composite"] = result["composite"]
    parts |= result.get("questions", {})  # a composite head: each question, scored from the joint choice
    report = [f"{loaded.name} on {name}: {len(ok)} images ({len(failures)} unreadable, {dropped} without labels)"]
    report += _left_out(loaded, outside, result)
    decision = _decision_steps(loaded, y_true, task_probs, y_pred, rule)
    report += [rule] + [f"[{t}] macro-F1 here: argmax {d['argmax']:.4f} -> with the decision rule {d['rule']:.4f}"
                        for t, d in decision.items()] if rule else []
    distribution = _per_task(parts, out, report)
    errors = number_errors(loaded, rows, pred)
    report += [f"[{t}] MAE {e['mae']:.2f} over {e['images']} images ({e['how']}); by true band: "
               + ", ".join(f"{b} {v:.2f}" for b, v in e["per_band"].items()) for t, e in errors.items()]
    probs = questions_of(loaded, task_probs)
    prior_report = _prior_report(loaded, probs, _question_truth(loaded, ys, ok), tta)
    report += _prior_lines(prior_report, in_sample=data is None)
    atomic_write_text(out / "report.txt", "\n".join(report) + "\n")
    write_json(out / "metrics.json", {"run": str(loaded.run_dir), "data": str(data or "validation split"),
                                      "images": len(ok), "unreadable": failures, "unlabelled_dropped": dropped,
                                      "metrics": result, "distribution": distribution, "prior_shift": prior_report,
                                      "mae": errors,
                                      "decision": {"rule": rule, "macro_f1": decision} if rule else None})
    _predictions_file(loaded, pred, probs, _truth_names(loaded, _question_truth(loaded, ys, ok)), picks, out)
    return {"out": out, "report": "\n".join(report), "metrics": result}


def _predictions_file(loaded, pred, probs: dict, truth: dict, task_picks: dict, out: Path) -> None:
    """predictions.csv: the answer the report scored (a composite head's joint choice, its parts in the question
    columns; its probabilities written as marginals), with each question's true class."""
    from framework.inference.predict import marginal_questions, question_picks, write_predictions

    pred.probs, pred.marginal, pred.truth = probs, marginal_questions(loaded), truth
    write_predictions(out / "predictions.csv", pred, loaded.questions(), loaded.composite_order(),
                      picks=question_picks(loaded, task_picks))


def _left_out(loaded, outside: dict, result: dict) -> list[str]:
    """Report lines: labels that are no class of the run, and tasks the data has no labels for."""
    from framework.engine.metrics import task_scores

    lines = ["left out, not classes of this run: " + ", ".join(f"{v} {n}" for v, n in outside.items())] if outside else []
    unscored = [t for t in loaded.labels if t not in task_scores(result, name=next(iter(loaded.labels)))]
    if unscored:
        lines.append(f"not scored (this data has no labels for them): {', '.join(unscored)}")
    return lines


def _prior_lines(prior_report: dict, in_sample: bool = False) -> list[str]:
    """The prior-shift steps per question (of the questions' own probabilities: for a composite head, its
    marginals). On the run's own validation split the calibration was fitted on these very images: in-sample."""
    tag = "IN-SAMPLE (the calibration was fitted on these images) " if in_sample else ""
    return [f"[{q}] {tag}test priors: true {_fmt(r['true'])}, training {_fmt(r['train'])} (L1 {r['l1_train']:.3f}), "
            f"EM estimate {_fmt(r['estimated'])} (L1 {r['l1_estimated']:.3f}). Two steps, raw -> calibrated on the "
            f"run's validation split -> re-weighted to the estimate: macro-F1 {r['macro_f1']:.4f} -> "
            f"{r['macro_f1_calibrated']:.4f} -> {r['macro_f1_shifted']:.4f}, accuracy {r['accuracy']:.4f} -> "
            f"{r['accuracy_calibrated']:.4f} -> {r['accuracy_shifted']:.4f}, log-loss {r['log_loss']:.3f} -> "
            f"{r['log_loss_calibrated']:.3f} -> {r['log_loss_shifted']:.3f}" for q, r in prior_report.items()]


def number_errors(loaded, rows: list[dict], pred) -> dict:
    """Per task cut into bands from a number (age): the mean absolute error in the data's units, overall and per
    true band. A regression task is judged by its predicted number; an ordinal or banded class task by its expected
    value (each band's probability times the mean training value of that band, from the run's split.csv)."""
    from framework.data.labels import numbers

    out = {}
    for task, spec in loaded.recipe.task_specs().items():
        head = loaded.heads[task]
        if spec.bins is None or not spec.column:
            continue
        truth = np.array(numbers(rows, spec.column))[pred.ok] if pred.ok else np.zeros(0)
        estimate = head.estimate(pred.probs[task], pred.values.get(task), lambda: _band_means(loaded, task))  # noqa: B023
        if estimate is None:
            continue
        guess, how = estimate
        has = ~np.isnan(truth)
        if not has.any():
            continue
        band = np.searchsorted(np.asarray(head.bins), truth, side="right")
        err = np.abs(guess - truth)
        out[task] = {"mae": float(err[has].mean()), "images": int(has.sum()), "how": how,
                     "per_band": {c: float(err[has & (band == k)].mean()) for k, c in enumerate(loaded.labels[task].classes)
                                  if (has & (band == k)).any()}}
    return out


def _band_means(loaded, task: str) -> np.ndarray | None:
    """Each band's mean value over the run's training images (split.csv `<task>_value`), or None without them."""
    from framework.engine.metrics import band_means
    from framework.inference.run import split_rows

    values = [float(r[f"{task}_value"]) for r in split_rows(loaded, "train") if r.get(f"{task}_value")]
    return band_means(values, loaded.heads[task].bins, len(loaded.labels[task].classes)) if values else None


def _decision_steps(loaded, y_true, task_probs, y_pred, rule) -> dict:
    """Per task the decision rule decided: macro-F1 with the plain argmax and with the rule (separate steps)."""
    from framework.engine.metrics import macro_f1
    from framework.inference.decision import offsets_of

    if not rule:
        return {}
    decided = offsets_of(loaded)
    return {t: {"argmax": macro_f1(y_true[:, j], task_probs[t].argmax(1), len(lab.classes)),
                "rule": macro_f1(y_true[:, j], y_pred[:, j], len(lab.classes))}
            for j, (t, lab) in enumerate(loaded.labels.items()) if t in decided}


def default_folder(data: str | Path) -> str:
    """`<name>-<8 hex of its full path>`: a/manifest.csv and b/manifest.csv get folders of their own."""
    import hashlib

    path = Path(data).resolve()
    return f"{path.stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def _per_task(parts: dict, out: Path, report: list[str]) -> dict:
    """Per task (and the composite): its confusion matrix PNG in `out`, its lines in `report`, and its class
    distribution (true -> predicted), returned."""
    from PIL import Image

    from framework.engine.metrics import format_report
    from framework.engine.tb import confusion_image

    distribution = {}
    for task, sc in parts.items():
        Image.fromarray(confusion_image(sc["confusion"], list(sc["per_class"]))).save(out / f"confusion_{task}.png")
        cm = np.asarray(sc["confusion"])
        distribution[task] = {c: {"true": int(cm[k].sum()), "predicted": int(cm[:, k].sum())}
                              for k, c in enumerate(sc["per_class"])}
        report += ["", f"[{task}] accuracy {sc['accuracy']:.4f}  macro-F1 {sc['macro_f1']:.4f}", format_report(sc),
                   "class distribution (true -> predicted): " + ", ".join(
                       f"{c} {d['true']}->{d['predicted']}" for c, d in distribution[task].items())]
    return distribution


def _truth_names(run, truth: dict) -> dict[str, list[str]]:
    classes = run.questions()
    return {q: [classes[q][k] if k >= 0 else "" for k in t] for q, t in truth.items()}


def _question_truth(run, ys: dict, ok: list[int]) -> dict:
    """Per question, the true class index of each readable image (-1 = no label); composite heads are split."""
    truth = {}
    for task, lab in run.labels.items():
        codes = np.array([ys[task][i] for i in ok], dtype=np.int64)
        truth.update(lab.decode(codes) if lab.parts else {task: codes})
    return truth


def _fmt(shares: dict) -> str:
    return "/".join(f"{v:.2f}" for v in shares.values())


def _prior_report(run, probs: dict, truth: dict, tta: str | None = None) -> dict:
    """How far the EM estimate of the test priors lands from the true ones (and the training priors), and what
    re-weighting does to macro-F1 - on labelled data, where the truth is known."""
    from framework.engine.metrics import macro_f1
    from framework.inference import priors as PS

    classes, counts, out = run.questions(), PS.train_counts(run), {}
    moved = {t for t, h in run.heads.items() if h.learns == "number"}  # bands may differ from training
    calib = PS.calibration(run, tta) if set(probs) - moved else {}
    for q, p in probs.items():
        has = truth[q] >= 0
        if not has.any() or q not in calib or q in moved:
            continue
        n = len(classes[q])
        true = np.bincount(truth[q][has], minlength=n) / has.sum()
        train = np.array(list(counts[q].values()), float) / max(1, sum(counts[q].values()))
        c = calib[q]
        calibrated = PS.calibrate(p[has], c["temperature"], c["bias"])
        estimate, adjusted, _ = PS.em_priors(calibrated, np.array(c["prior"]))
        names, y = classes[q], truth[q][has]
        out[q] = {"true": dict(zip(names, true.tolist())), "train": dict(zip(names, train.tolist())),
                  "estimated": dict(zip(names, estimate.tolist())),
                  "calibration": c,
                  "l1_train": float(np.abs(train - true).sum()), "l1_estimated": float(np.abs(estimate - true).sum()),
                  **{f"{metric}{suffix}": value for suffix, probs_ in (("", p[has]), ("_calibrated", calibrated),
                                                                     ("_shifted", adjusted))
                     for metric, value in (("macro_f1", macro_f1(y, probs_.argmax(1), n)),
                                           ("accuracy", float((probs_.argmax(1) == y).mean())),
                                           ("log_loss", _log_loss(probs_, y)))}}
    return out


def _log_loss(probs, truth) -> float:
    """Mean negative log-probability of the true class (the quality of the probabilities, not only of the argmax)."""
    return float(-np.log(np.clip(probs[np.arange(len(truth)), truth], 1e-12, None)).mean())
