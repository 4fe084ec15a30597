"""The `predict` command's flow: a run's (or an export's) predictions of a list of images with their class shares,
re-weighted to other priors on request (framework.inference.priors), and the contest's answer file
(framework.inference.submission)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from framework.errors import Issue, RunError
from framework.inference.priors import calibration, composite_shares, distribution_table, shift, train_counts


def _load(run):
    """A run folder, a checkpoint or an export folder, loaded (a LoadedRun is taken as it is)."""
    from framework.inference.exported import load_export
    from framework.inference.run import LoadedRun, is_export, load_run

    if isinstance(run, LoadedRun):
        return run
    return load_export(run) if is_export(run) else load_run(run)


def predict_images(run, images, out: str | Path = "predictions.csv", tta: str | None = None,
                   proba: bool = False, prior_shift: str | None = None) -> dict:
    """Predict `images` (an ImageList: framework.inference.run.list_images) with a run's own evaluation transform
    (`run`: a folder, checkpoint or export, or a LoadedRun); unreadable images are listed, not fatal.

    Also writes `<out>.distribution.json`: per question, the class shares of the training split and of the
    predictions; with `prior_shift` ("em" or a JSON file of priors) the probabilities are re-weighted to the
    estimated (or given) test priors before classes are chosen."""
    from framework.inference.exported import ExportedRun
    from framework.inference.predict import (Predictions, marginal_questions, predict_tasks, write_failures,
                                             write_predictions)
    from framework.inference.run import face_boxes
    from framework.io import write_json

    loaded = _load(run)
    if prior_shift and isinstance(loaded, ExportedRun):
        raise RunError(Issue("--prior-shift needs the run folder (its validation split calibrates the probabilities); "
                             f"{loaded.run_dir} is an exported model.", field="--prior-shift",
                             fix="predict with the run folder the export came from (export.json: source_run)."))
    pred = predict_tasks(loaded, images.paths, tta, face_boxes(loaded, images.csv_file), progress=True)
    final, picks, rule, table, shares = _choices(loaded, pred, prior_shift, tta)
    out, order = Path(out), loaded.composite_order()
    written = Predictions(pred.paths, pred.ok, final, pred.failures, pred.values,
                          marginal=() if final is not pred.probs else marginal_questions(loaded))
    write_predictions(out, written, loaded.questions(), order, proba, picks)
    write_json(out.with_name(out.stem + ".distribution.json"), {"images": len(pred.ok), "prior_shift": prior_shift,
                                                                 "shares": shares})
    failed_file = out.with_name(out.stem + ".failed.csv")
    if pred.failures:
        write_failures(failed_file, pred.failures)
    return {"out": out, "predicted": len(pred.ok), "failed": pred.failures,
            "failed_file": failed_file if pred.failures else None, "distribution": table, "shares": shares,
            "decision": rule, "ok": pred.ok, "picks": picks}


def _choices(loaded, pred, prior_shift: str | None, tta: str | None) -> tuple:
    """(probabilities written, each question's class, the decision rule's sentence, the class-share table and
    shares): the run's own choice (a composite head's joint class, its decision rule), unless the probabilities
    are re-weighted to other priors: then each question's re-weighted argmax."""
    from framework.inference.decision import choose
    from framework.inference.predict import questions_of

    task_probs = pred.probs
    pred.probs = probs = questions_of(loaded, task_probs)
    classes = loaded.questions()
    train = {q: np.array(list(c.values()), float) / max(1, sum(c.values())) for q, c in train_counts(loaded).items()}
    estimated = adjusted = None
    if prior_shift:
        adjusted, estimated = shift(probs, prior_shift, classes, calibration(loaded, tta))
    final = adjusted or probs
    picks, rule = ({q: p.argmax(1) for q, p in final.items()}, None) if adjusted else choose(loaded, task_probs)
    order = loaded.composite_order()
    composite = composite_shares(loaded, picks, order) if order and pred.ok else None
    # "predicted": the shares of what is written (with a prior shift: of the unadjusted argmax, beside the shifted)
    chosen = probs if adjusted else {q: np.eye(len(classes[q]))[picks[q]] for q in probs}
    table, shares = distribution_table(classes, train, chosen, estimated, adjusted, composite)
    return final, picks, rule, table, shares


def submit_images(run, images, out: str | Path = "submission.csv", answer: str = "ans", tta: str | None = None) -> dict:
    """The contest's submission: `images` listed in a CSV (the contest's info.csv), written back to `out` with every
    row, column and order kept and `answer` set to each image's class index, mask*6 + gender*3 + age (the run's
    composite answer: framework.inference.submission). The predictions go beside it (`<out>.predictions.csv`)."""
    from framework.inference.submission import contest_index, contest_order, write_submission

    if images.rows is None:
        raise RunError(Issue("--answer fills a column of the CSV the images are listed in.", field="--answer",
                             fix="give the contest's info.csv with --csv (and --image-column ImageID --root "
                                 "eval/images)."))
    loaded = _load(run)
    order = contest_order(loaded)  # (refused before anything is predicted)
    out = Path(out)
    result = predict_images(loaded, images, out.with_name(out.stem + ".predictions.csv"), tta)
    index = dict(zip(result["ok"], map(int, contest_index(result["picks"], order)))) if result["ok"] else {}
    mapping, empty = write_submission(out, images, answer, index)
    return result | {"submission": out, "classes_file": mapping, "unanswered": empty}
