"""Test-set class distribution: what the model predicts, the training split's, and the EM estimate of the test
priors from the model's probabilities alone (Saerens, Latinne & Decaestecker 2002, "Adjusting the outputs of a
classifier to new a priori probabilities: a simple procedure").

EM: start from the training priors p_t; repeat  w = q / p_t;  r_i = p(y|x_i) * w / sum(...);  q = mean_i r_i  until q
stops moving. The final r_i are the probabilities re-weighted for the new priors q. The probabilities are first
calibrated on the run's validation split (bias-corrected temperature scaling), so p_t is that split's class mix.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from framework.data.labels import LabelSet
from framework.errors import Issue, RunError


def adjust(probs: np.ndarray, train_prior: np.ndarray, new_prior: np.ndarray) -> np.ndarray:
    """Posteriors (N, C) of a model trained under `train_prior`, re-weighted to `new_prior` (Bayes' rule)."""
    w = np.asarray(new_prior, dtype=float) / np.clip(np.asarray(train_prior, dtype=float), 1e-12, None)
    out = probs * w
    return out / np.clip(out.sum(1, keepdims=True), 1e-12, None)


def em_priors(probs: np.ndarray, train_prior: np.ndarray, tol: float = 1e-8, max_iter: int = 1000):
    """(estimated test priors (C,), re-weighted posteriors (N, C), iterations)."""
    train_prior = np.asarray(train_prior, dtype=float)
    q = train_prior.copy()
    adjusted = probs
    for it in range(1, max_iter + 1):
        adjusted = adjust(probs, train_prior, q)
        new = adjusted.mean(0)
        if np.abs(new - q).sum() < tol:
            return new, adjusted, it
        q = new
    return q, adjusted, max_iter


def calibrate(probs: np.ndarray, temperature: float, bias) -> np.ndarray:
    """softmax(log p / T + b): temperature scaling with a bias per class (BCTS)."""
    z = np.log(np.clip(probs, 1e-12, 1.0)) / temperature + np.asarray(bias)
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_bcts(probs: np.ndarray, y: np.ndarray) -> tuple[float, list[float]]:
    """Temperature and per-class biases that minimise the negative log-likelihood of labelled samples.

    Bias-corrected temperature scaling (Alexandari, Kundaje & Shrikumar 2020): after it, the probabilities are
    calibrated to the labelled set's class mix, which is what EM needs as its starting point."""
    import torch

    z = torch.tensor(np.log(np.clip(probs, 1e-12, 1.0)), dtype=torch.float64)
    target = torch.tensor(y)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(probs.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp() + bias, target)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp()), [float(b) for b in bias.detach()]


def calibration(run, tta: str | None = None) -> dict[str, dict]:
    """Per question: BCTS parameters fitted on the run's own validation split, and that split's class shares
    (the prior the calibrated probabilities carry). Fitted on the same outputs as those it calibrates: with the
    test-time augmentation `tta` (None: the run's default, "none": off) and, for a face-cropping run, the faces
    cropped by the data's boxes as in validation. Cached in the run folder, per checkpoint and TTA.

    EM needs calibrated probabilities: label smoothing, class weights and balanced sampling all move them away
    from the training priors, and EM then estimates the wrong test priors."""
    from framework.folders import RunFolder
    from framework.inference.predict import predict_proba
    from framework.inference.run import resolve_tta, run_boxes, split_rows

    mode = resolve_tta(run, tta)
    folder = RunFolder(run.run_dir)
    stamp = f"{run.checkpoint.name}:{run.checkpoint.stat().st_mtime_ns}:tta={mode or 'none'}"
    cached = folder.calibration()
    if cached is not None and cached["checkpoint"] == stamp:
        return cached["questions"]
    val = split_rows(run, "val")
    paths = [r["path"] for r in val]
    pred = predict_proba(run, paths, mode or "none", run_boxes(run, paths))
    probs, ok = pred.probs, pred.ok
    classes, out = run.questions(), {}
    for q, p in probs.items():
        task = q if q in run.labels else next(t for t, lab in run.labels.items() if lab.parts and q in lab.parts)
        if run.heads[task].learns == "number":
            continue  # a number, not class probabilities: there is nothing to re-weight
        y = np.array([classes[q].index(val[i][q]) if val[i][q] in classes[q] else -1 for i in ok])
        has = y >= 0
        if has.sum() < 2:
            continue
        t, b = fit_bcts(p[has], y[has])
        prior = np.bincount(y[has], minlength=len(classes[q])) / has.sum()
        out[q] = {"temperature": t, "bias": b, "prior": prior.tolist()}
    folder.write_calibration({"checkpoint": stamp, "questions": out})
    return out


def train_counts(run) -> dict[str, dict[str, int]]:
    """Per question, the training split's class counts (from the run's split.csv; an exported run stores them)."""
    from framework.inference.run import split_rows

    if run.class_counts is not None:
        return run.class_counts
    rows = split_rows(run, "train")
    out: dict[str, dict[str, int]] = {}
    for q, classes in run.questions().items():
        counts = dict.fromkeys(classes, 0)
        for r in rows:
            if r.get(q) in counts:  # (a regression task whose cut points were moved has other band names)
                counts[r[q]] += 1
        out[q] = counts
    return out


def known_priors(path: str | Path, classes: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Priors from a JSON file {question: {class: share}} (shares are normalised)."""
    from framework.io import FileProblem, read_text

    example = 'write JSON such as {"mask": {"wear": 0.1, "incorrect": 0.1, "not_wear": 0.8}}.'
    try:
        data = json.loads(read_text(path, 1 << 20))
    except (FileProblem, ValueError) as e:
        raise RunError(Issue(f"cannot read priors from {path}: {e}.", field="--prior-shift", fix=example)) from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise RunError(Issue(f"{path} holds no {{question: {{class: share}}}} mapping.", field="--prior-shift",
                             fix=example))
    out = {}
    for q, shares in data.items():
        if q not in classes:
            raise RunError(Issue(f"{path}: no question {q!r} (questions: {', '.join(classes)}).",
                                 field="--prior-shift", fix="use the run's question names."))
        missing = [c for c in classes[q] if c not in shares]
        if missing or any(float(v) < 0 for v in shares.values()):
            raise RunError(Issue(f"{path}: {q} needs a non-negative share for every class; missing {missing}.",
                                 field="--prior-shift", fix=f"give shares for {', '.join(classes[q])}."))
        p = np.array([float(shares[c]) for c in classes[q]])
        out[q] = p / p.sum()
    return out


def shift(probs: dict[str, np.ndarray], how: str, classes: dict[str, list[str]], calib: dict[str, dict]):
    """Per question: probabilities re-weighted to the test priors, and those priors. `how` = "em" estimates them
    from the probabilities (calibrated with `calib` first), or is a JSON file that gives them."""
    targets = known_priors(how, classes) if how != "em" else {}
    adjusted, used = {}, {}
    for q, p in probs.items():
        if q not in calib or (how != "em" and q not in targets):
            adjusted[q] = p  # no labelled validation data to calibrate this question, or no prior given for it
            continue
        c = calib[q]
        p = calibrate(p, c["temperature"], c["bias"])
        if how == "em":
            used[q], adjusted[q], _ = em_priors(p, np.array(c["prior"]))
        else:
            used[q], adjusted[q] = targets[q], adjust(p, np.array(c["prior"]), targets[q])
    return adjusted, used


def composite_shares(run, picks: dict[str, np.ndarray], order: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Composite class names, the predicted shares, and the training split's shares (rows with every part)."""
    from framework.inference.predict import composite_of

    codec = composite_of(order, run.questions())
    names = codec.classes
    predicted = np.bincount(codec.encode([picks[q] for q in order]), minlength=len(names)) / max(len(next(iter(picks.values()))), 1)
    train = composite_counts(run, order)
    counts = np.array([train[n] for n in names], dtype=float)
    return names, predicted, counts / max(counts.sum(), 1)


def composite_counts(run, order: list[str]) -> dict[str, int]:
    """The training split's count of each composite class (rows with every part; an exported run stores them)."""
    from framework.inference.predict import composite_of
    from framework.inference.run import split_rows

    if run.composite_counts is not None:
        return run.composite_counts
    values = Counter(LabelSet.joined(r[q] for q in order) for r in split_rows(run, "train")
                     if all(r.get(q) for q in order))
    return {n: values.get(n, 0) for n in composite_of(order, run.questions()).classes}


def _shares(p: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(p.argmax(1), minlength=n) / max(len(p), 1)


def distribution_table(classes: dict[str, list[str]], train: dict[str, np.ndarray], predicted: dict[str, np.ndarray],
                       estimated: dict[str, np.ndarray] | None = None,
                       adjusted: dict[str, np.ndarray] | None = None, composite=None) -> tuple[str, dict]:
    """A text table and a JSON-able dict of class shares: training split, predicted, EM estimate, re-weighted;
    `composite` = (names, predicted shares, training shares) adds the composite label."""
    lines, data = [], {}
    rows = {q: (cls, {"train": train[q], "predicted": _shares(predicted[q], len(cls))}) for q, cls in classes.items()}
    if composite is not None:
        names, pred, tr = composite
        keep = [k for k in range(len(names)) if pred[k] or tr[k]]
        rows["composite"] = ([names[k] for k in keep], {"train": tr[keep], "predicted": pred[keep]})
    for q, (cls, cols) in rows.items():
        if estimated and q in estimated:
            cols["estimated priors"] = estimated[q]
            cols["predicted after shift"] = _shares(adjusted[q], len(cls))
        width = max(len(f"[{q}]"), *(len(c) + 2 for c in cls))
        lines.append(f"{'[' + q + ']':<{width}}" + "".join(f"  {k:>21}" for k in cols))
        for k, c in enumerate(cls):
            lines.append(f"  {c:<{width - 2}}" + "".join(f"  {v[k]:>21.3f}" for v in cols.values()))
        data[q] = {name: {c: float(v[k]) for k, c in enumerate(cls)} for name, v in cols.items()}
    return "\n".join(lines), data
