"""A decision rule for macro-F1: per-class offsets added to the log-probabilities before the argmax.

The argmax of the probabilities maximises accuracy, not macro-F1: a rare class (92 incorrectly worn masks among
3,054 faces) is under-called, since every one of its errors costs one image while it weighs a third of the score.
Offsets fitted on validation predictions (coordinate ascent on a grid, ties to the smallest change) move the
boundaries towards the rare class. They are fitted on one run's validation split, or, for a k-fold recipe, on the
pooled out-of-fold predictions of all folds (18 validation faces of one fold cannot tune anything) and stored in
each run folder as `decision.json`; predict, evaluate and ensemble then use them and say so.

Scores of the offsets on the data they were fitted on are optimistic, so the report has three steps: argmax, then
offsets fitted on the other parts (the folds, or five stratified parts of one validation split) and scored on the
part left out ("cross-fitted": the estimate to trust), then the stored offsets fitted on everything.
Only plain classification tasks get offsets (an anomaly task has its own threshold; a composite head's parts and
regression bands keep the argmax).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np

from framework.engine.metrics import macro_f1

GRID = np.round(np.linspace(-3.0, 3.0, 61), 2)  # offsets on log-probabilities: factors e^-3 .. e^3


def fit_offsets(probs: np.ndarray, y: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Per-class offsets (C,) maximising the macro-F1 of argmax(log p + offsets) on (probs, y), by coordinate
    ascent over GRID; a change is kept only if it raises the score, and the smallest such change wins."""
    logp, n = np.log(np.clip(probs, 1e-12, 1.0)), probs.shape[1]
    off = np.zeros(n)
    best = macro_f1(y, logp.argmax(1), n)
    order = GRID[np.argsort(np.abs(GRID), kind="stable")]
    for _ in range(rounds):
        improved = False
        for c in range(n):
            for v in order:
                trial = off.copy()
                trial[c] = v
                score = macro_f1(y, (logp + trial).argmax(1), n)
                if score > best + 1e-12:
                    best, off, improved = score, trial, True
        if not improved:
            break
    return off - off.mean()


def pick(probs: np.ndarray, offsets) -> np.ndarray:
    """The classes chosen with the offsets."""
    return (np.log(np.clip(probs, 1e-12, 1.0)) + np.asarray(offsets, dtype=float)).argmax(1)


def shifted(probs: np.ndarray, offsets) -> np.ndarray:
    """Probabilities whose argmax is `pick(probs, offsets)` (for voting)."""
    z = np.log(np.clip(probs, 1e-12, 1.0)) + np.asarray(offsets, dtype=float)
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def cross_fitted(probs: np.ndarray, y: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """Each part's picks with offsets fitted on the other parts only (an honest estimate of the rule)."""
    out = probs.argmax(1)
    for k in np.unique(parts):
        mine = parts == k
        out[mine] = pick(probs[mine], fit_offsets(probs[~mine], y[~mine]))
    return out


def stratified_parts(y: np.ndarray, k: int = 5, seed: int = 0) -> np.ndarray:
    """k parts of one validation split, every class spread over all of them."""
    rng, parts = np.random.default_rng(seed), np.zeros(len(y), dtype=int)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        parts[idx] = np.arange(len(idx)) % k
    return parts


def questions(run) -> list[str]:
    """The questions the rule applies to: plain classification tasks."""
    return [t for t, h in run.heads.items() if h.class_offsets and not run.labels[t].parts]


def stamp(run) -> str:
    """The checkpoint the offsets belong to, by content (a copied run folder keeps them)."""
    st = run.checkpoint.stat()
    return f"{run.checkpoint.name}:{_digest(str(run.checkpoint), st.st_mtime_ns, st.st_size)}"


@functools.lru_cache(maxsize=64)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    """sha256 of a file (once per version of it: predict, evaluate and ensemble ask several times)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def stored(run) -> dict | None:
    """The run's decision.json when it belongs to the checkpoint in use, else None."""
    data = _folder(run).decision()  # (damaged or edited: a located RunError)
    if data is None or data["checkpoint"] != stamp(run):
        return None  # none, or fitted for another checkpoint
    return data


def _folder(run):
    """The folder the rule is kept in: a run folder, or an export folder (same file name)."""
    from framework.folders import RunFolder

    return RunFolder(run.run_dir)


def offsets_of(run) -> dict[str, np.ndarray]:
    """Question -> offsets in class order, from the run's decision.json (none: argmax; all-zero offsets, the
    argmax kept because the offsets did not help on held-out parts, count as none)."""
    data = stored(run)
    if data is None:
        return {}
    from framework.folders import damaged

    classes = run.questions()
    out = {}
    for q, entry in data["questions"].items():
        if q not in classes or set(entry["offsets"]) != set(classes[q]):
            raise damaged(_folder(run).file(_folder(run).DECISION),
                          f"the offsets of {q!r} name classes {sorted(entry['offsets'])}, but the run's "
                          f"{q!r} has {classes.get(q)}.", field=f"questions.{q}.offsets",
                          fix="remove decision.json, or fit it again with `recipe evaluate RUN --decision "
                              "macro_f1`.")
        offsets = np.array([float(entry["offsets"][c]) for c in classes[q]])
        if np.any(offsets):
            out[q] = offsets
    return out


def apply(run, probs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str | None]:
    """Each question's picks (offsets where the run has them, else argmax) and a sentence saying what was used."""
    offsets = offsets_of(run)
    picks = {q: pick(p, offsets[q]) if q in offsets else p.argmax(1) for q, p in probs.items()}
    if not offsets:
        return picks, None
    data = stored(run)
    return picks, (f"decision rule: per-class offsets for {', '.join(offsets)} fitted on {data['fitted_on']} "
                   f"(macro-F1 there {data['summary']}); the probabilities are unchanged")


def choose(run, task_probs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str | None]:
    """Each question's class as the run itself answers (its decision rule where it has one; a composite head's
    joint choice, split into its parts), and the rule's sentence: the one answer predict, evaluate and an
    ensemble's member line all report."""
    from framework.inference.predict import question_picks

    task_picks, rule = apply(run, task_probs)
    return question_picks(run, task_picks), rule


def validation_predictions(run, tta: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Question -> (probabilities, true class) on the run's own validation split, as validation scored them."""
    from framework.inference.predict import predict_proba
    from framework.inference.run import resolve_tta, run_boxes, split_rows

    val = split_rows(run, "val")
    paths = [r["path"] for r in val]
    pred = predict_proba(run, paths, resolve_tta(run, tta) or "none", run_boxes(run, paths))
    classes, out = run.questions(), {}
    for q in questions(run):
        y = np.array([classes[q].index(val[i][q]) if val[i][q] in classes[q] else -1 for i in pred.ok])
        has = y >= 0
        out[q] = (pred.probs[q][has], y[has])
    return out


def fit_and_store(runs: list, how: str, preds: list[dict]) -> dict:
    """Fit each question's offsets on the pooled predictions of `runs` (one run: its validation split; k fold
    runs: their out-of-fold predictions), write them into every run folder, return the three-step report."""
    report, y = {}, np.zeros(0)
    for q in preds[0]:
        probs = np.concatenate([p[q][0] for p in preds])
        y = np.concatenate([p[q][1] for p in preds])
        if len(np.unique(y)) < 2:
            continue  # nothing to tune on one class (or none)
        parts = (np.concatenate([np.full(len(p[q][1]), k) for k, p in enumerate(preds)]) if len(preds) > 1
                 else stratified_parts(y))
        n, off = probs.shape[1], fit_offsets(probs, y)
        classes = runs[0].questions()[q]
        steps = {"argmax": probs.argmax(1), "cross_fitted": cross_fitted(probs, y, parts), "fitted": pick(probs, off)}
        scores = {f"macro_f1_{k}": macro_f1(y, v, n) for k, v in steps.items()}
        kept = scores["macro_f1_cross_fitted"] > scores["macro_f1_argmax"]  # else the offsets only fit noise
        report[q] = {"offsets": {c: round(float(v), 4) if kept else 0.0 for c, v in zip(classes, off)},
                     "kept": "offsets" if kept else "argmax", "fitted_offsets": [round(float(v), 4) for v in off],
                     "images": int(len(y)), **scores,
                     "class_f1": {k: _class_f1(y, v, classes) for k, v in steps.items()}}
    fitted_on = f"{how} ({len(y)} images)"
    summary = ", ".join(f"{q}: argmax {r['macro_f1_argmax']:.4f}, cross-fitted {r['macro_f1_cross_fitted']:.4f}"
                        for q, r in report.items())
    for run in runs:
        _folder(run).write_decision({"rule": "macro-F1 offsets", "checkpoint": stamp(run), "fitted_on": fitted_on,
                                        "summary": summary, "questions": report})
    return {"fitted_on": fitted_on, "questions": report}


def _class_f1(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict[str, float]:
    from framework.engine.metrics import confusion, scores

    per = scores(confusion(y, pred, len(classes)), classes)["per_class"]
    return {c: round(float(per[c]["f1"]), 4) for c in classes}


def fit_runs(run_dirs: list[str | Path], tta: str | None = None) -> dict:
    """The rule for one run (its validation split) or for the k fold runs of one recipe (pooled out-of-fold)."""
    from framework.inference.run import load_run

    runs = [load_run(r) for r in run_dirs]
    how = "its validation split" if len(runs) == 1 else f"the pooled out-of-fold predictions of {len(runs)} folds"
    return fit_and_store(runs, how, [validation_predictions(r, tta) for r in runs])


def report_lines(result: dict) -> list[str]:
    """The three steps per question, one line each, and the stored offsets."""
    lines = []
    for q, r in result["questions"].items():
        lines.append(f"[{q}] decision rule for macro-F1, fitted on {result['fitted_on']}: argmax "
                     f"{r['macro_f1_argmax']:.4f} -> offsets fitted on the other parts {r['macro_f1_cross_fitted']:.4f} "
                     f"(the estimate to trust) -> offsets fitted on all {r['macro_f1_fitted']:.4f} (optimistic)")
        f1 = r["class_f1"]
        lines.append("    class F1 (argmax / cross-fitted): " + ", ".join(
            f"{c} {f1['argmax'][c]:.3f}/{f1['cross_fitted'][c]:.3f}" for c in f1["argmax"]))
        if r["kept"] == "offsets":
            lines.append("    offsets stored and used: " + ", ".join(f"{c} {v:+.2f}" for c, v in r["offsets"].items()))
        else:
            lines.append("    not used: on held-out parts the offsets did no better than the argmax (too few "
                         "images to tune on); predictions keep the argmax")
    return lines
