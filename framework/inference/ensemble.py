"""Ensembles: hard and soft voting over runs (backbones, seeds, folds, or one model per task), prior shift for an
ensemble, and the members' and the ensemble's validation scores when they share a split."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from framework.engine.metrics import flat_metrics, macro_f1
from framework.errors import Issue, RunError
from framework.inference.decision import choose, offsets_of, pick, shifted
from framework.inference.predict import (Predictions, composite_of, marginal_questions, predict_tasks, questions_of,
                                         write_failures, write_predictions)
from framework.inference.run import ImageList, LoadedRun, load_run, split_rows

CONTEST_ORDER = ["mask", "gender", "age"]


@dataclass
class Voting:
    """How the members are combined."""

    method: str = "soft"  # hard | soft
    weights: str = "equal"  # equal | val:<metric> | w1,w2,...
    composite: str | None = None  # questions that form the composite answer, e.g. "mask,gender,age"
    tta: str | None = None  # None: each run's eval.tta; "none": off
    prior_shift: str | None = None  # em | a JSON file of priors


def hard_vote(member_probs: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Weighted majority of the members' picks; a tie goes to the tied class with the higher weighted mean
    probability (then to the lower class index)."""
    n, c = member_probs[0].shape
    votes = np.zeros((n, c))
    for p, w in zip(member_probs, weights):
        votes[np.arange(n), p.argmax(1)] += w
    mean = soft_vote(member_probs, weights)
    top = votes.max(1, keepdims=True)
    tied = np.isclose(votes, top)
    return np.where(tied, mean, -np.inf).argmax(1)


def soft_vote(member_probs: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Weighted average of the members' probabilities (N, C)."""
    w = np.asarray(weights, dtype=float)
    return np.tensordot(w / w.sum(), np.stack(member_probs), axes=1)


def member_score(run_dir: Path, metric: str) -> float:
    """A run's best validation value of `metric` (e.g. `macro_f1`, `mask/macro_f1`) from metrics.jsonl."""
    key = metric if metric.startswith("val/") else f"val/{metric}"
    from framework.folders import RunFolder

    values = [flat[key] for flat in map(flat_metrics, RunFolder(run_dir).metrics()) if key in flat]
    if not values:
        raise RunError(Issue(f"{run_dir.name} has no validation value of {key!r}.", field="--weights",
                             fix="use a metric its metrics.jsonl has, e.g. val:macro_f1."))
    return max(values)


def ensemble_weights(runs: list[LoadedRun], spec: str) -> list[float]:
    if spec == "equal":
        return [1.0] * len(runs)
    if spec.startswith("val:"):
        return [member_score(r.run_dir, spec[4:]) for r in runs]
    try:
        weights = [float(x) for x in spec.split(",")]
    except ValueError:
        weights = []
    if len(weights) != len(runs) or any(w < 0 for w in weights) or not sum(weights) > 0:
        raise RunError(Issue(f"--weights {spec!r}: expected equal, val:<metric>, or {len(runs)} non-negative numbers.",
                             field="--weights", fix="e.g. --weights 1,1,2 or --weights val:macro_f1."))
    return weights


def combine(runs: list[LoadedRun], member_probs: list[dict[str, np.ndarray]], method: str,
            weights: list[float], member_values: list[dict] | None = None, rules: bool = True):
    """Per question: the ensemble's probabilities, its picks, and the classes. Members answer the questions they
    have; a question's classes must agree across the members that answer it. When every member answering a
    question is a regression run, the ensemble averages their numbers (weighted) and bins the mean. With `rules`,
    members' decision rules (framework.inference.decision) choose the classes where every member has one."""
    classes: dict[str, list[str]] = {}
    for r in runs:
        for q, c in r.questions().items():
            if classes.setdefault(q, c) != c:
                raise RunError(Issue(f"members disagree on the classes of {q!r}: {classes[q]} vs {c} ({r.name}).",
                                     field="RUN", fix="ensemble runs trained with the same classes."))
    probs, picks = {}, {}
    member_values = member_values or [{} for _ in runs]
    offsets = [offsets_of(r) if rules else {} for r in runs]  # each member's decision rule, where it has one
    for q in classes:
        have = [(m[q], w, v.get(q), r) for m, w, v, r in zip(member_probs, weights, member_values, runs) if q in m]
        ps, ws = [p for p, *_ in have], [w for _, w, *_ in have]
        if all(v is not None for _, _, v, _ in have):  # regression members: average the number, then bin it
            mean = sum(v * w for _, w, v, _ in have) / sum(ws)
            band = torch.bucketize(torch.tensor(mean, dtype=torch.float32).contiguous(), have[0][3].heads[q].bins,
                                   right=True).numpy()
            picks[q] = band
            probs[q] = np.eye(len(classes[q]))[band]
            continue
        probs[q] = soft_vote(ps, ws)
        offs = [o[q] for m, o in zip(member_probs, offsets) if q in m and q in o]
        if len(offs) == len(ps):  # every member's rule: its own picks vote, or the weighted mean offsets decide
            picks[q] = hard_vote([shifted(p, o) for p, o in zip(ps, offs)], ws) if method == "hard" \
                else pick(probs[q], np.average(offs, axis=0, weights=ws))
        else:
            picks[q] = hard_vote(ps, ws) if method == "hard" else probs[q].argmax(1)
    return probs, picks, classes


def decision_note(runs: list[LoadedRun]) -> str | None:
    """Which questions the members' decision rules decided (all members must have one for a question)."""
    have = [set(offsets_of(r)) for r in runs]
    both = set.intersection(*have) if have else set()
    if not both:
        return None
    return (f"decision rule: the members' macro-F1 offsets decide {', '.join(sorted(both))} (hard voting: each "
            "member's own picks; soft: the weighted mean offsets on the mean probabilities)")


def composite_order_of(runs: list[LoadedRun], questions: list[str], requested: str | None = None) -> list[str] | None:
    """The parts of the composite answer: as requested, else a composite member's, else mask/gender/age."""
    if requested:
        order = [x.strip() for x in requested.split(",")]
        missing = [q for q in order if q not in questions]
        if missing:
            raise RunError(Issue(f"--composite names {missing}, which no member answers (they answer {questions}).",
                                 field="--composite", fix="list questions the members answer."))
        return order
    for r in runs:
        order = r.composite_order()
        if order and all(q in questions for q in order):
            return order
    if all(q in questions for q in CONTEST_ORDER):
        return CONTEST_ORDER
    return None


def truth_from_splits(runs: list[LoadedRun], questions: dict[str, list[str]]):
    """If all members share one validation split: its paths and, per question, the true class index (-1 = none)."""
    sides = [{row["path"]: row for row in split_rows(r, "val")} for r in runs]
    if any(sorted(s) != sorted(sides[0]) for s in sides[1:]):
        return None
    paths = sorted(sides[0])
    truth = {}
    for q, cls in questions.items():
        rows = next((s for s in sides if q in next(iter(s.values()), {})), None)
        if rows is not None:
            truth[q] = np.array([cls.index(rows[p][q]) if rows[p][q] else -1 for p in paths])
    return paths, truth



def ensemble(runs: list[str | Path], images: ImageList, out: str | Path = "ensemble.csv", voting: Voting = Voting(),
             proba: bool = False) -> dict:
    """Hard or soft voting over runs -> one prediction CSV. When the members share a validation split, each
    member's and the ensemble's validation macro-F1 are reported."""
    members = [load_run(r) for r in runs]
    w = ensemble_weights(members, voting.weights)
    preds = _aligned([predict_tasks(m, images.paths, voting.tta, progress=True) for m in members])
    member_probs = _votes(members, preds, voting.method)
    estimated = None
    if voting.prior_shift:
        member_probs, estimated = _shift_members(members, member_probs, w, voting)
    probs, picks, classes = combine(members, member_probs, voting.method, w, [p.values for p in preds],
                                    rules=not voting.prior_shift)  # re-weighted probabilities: the argmax
    order = composite_order_of(members, list(classes), voting.composite)
    out = Path(out)
    ok = preds[0].ok
    write_predictions(out, Predictions(images.paths, ok, probs, []), classes, order, proba, picks)
    failures = sorted({f for p in preds for f in p.failures})
    if failures:
        write_failures(out.with_name(out.stem + ".failed.csv"), failures)
    return {"out": out, "predicted": len(ok), "failed": failures, "weights": w, "composite": order,
            "decision": None if voting.prior_shift else decision_note(members),
            "estimated_priors": {q: v.tolist() for q, v in (estimated or {}).items()},
            "validation": _validation(members, voting, w, classes, order)}


def _votes(members: list[LoadedRun], preds: list[Predictions], method: str) -> list[dict[str, np.ndarray]]:
    """Each member's question probabilities (a composite head's: its marginals). For hard voting a composite head
    votes with its own answer, the joint choice's parts: its marginals are shifted so that their argmax is that
    answer (half the weight on it; the tie-break by mean probability still sees the marginals)."""
    votes = []
    for m, p in zip(members, preds):
        probs = questions_of(m, p.probs)
        if method == "hard":
            own = choose(m, p.probs)[0]
            for q in marginal_questions(m):
                probs[q] = 0.5 * probs[q] + 0.5 * np.eye(probs[q].shape[1])[own[q]]
        votes.append(probs)
    return votes


def _aligned(preds: list[Predictions]) -> list[Predictions]:
    """The members' predictions on the images every member could read."""
    ok = sorted(set.intersection(*(set(p.ok) for p in preds)))
    return [p.subset(ok) for p in preds]


def _shift_members(members, member_probs: list[dict], weights: list[float], voting: Voting):
    """Prior shift for an ensemble: each member's probabilities calibrated on its own validation split; the test
    priors estimated once by EM on their weighted average (starting from the members' average prior), or given;
    then every member re-weighted from its own prior to them, so hard and soft voting both use them."""
    from framework.inference import priors as PS

    how = voting.prior_shift
    calibs = [PS.calibration(m, voting.tta) for m in members]
    classes = {q: c for m in members for q, c in m.questions().items()}
    targets = PS.known_priors(how, classes) if how != "em" else {}
    calibrated = [{q: PS.calibrate(p, c[q]["temperature"], c[q]["bias"]) if q in c else p for q, p in mp.items()}
                  for mp, c in zip(member_probs, calibs)]
    estimated = {}
    for q in classes:
        have = [(mp[q], c[q], wt) for mp, c, wt in zip(calibrated, calibs, weights) if q in mp and q in c]
        if not have or (how != "em" and q not in targets):
            continue
        wsum = sum(wt for *_, wt in have)
        if how == "em":
            mean_p = sum(p * wt for p, _, wt in have) / wsum
            mean_prior = sum(np.array(c["prior"]) * wt for _, c, wt in have) / wsum
            estimated[q], _, _ = PS.em_priors(mean_p, mean_prior)
        else:
            estimated[q] = targets[q]
    shifted = [{q: PS.adjust(p, np.array(c[q]["prior"]), estimated[q]) if q in estimated and q in c else p
                for q, p in mp.items()} for mp, c in zip(calibrated, calibs)]
    return shifted, estimated


def _validation(members, voting: Voting, weights, classes, order):
    """Members' and the ensemble's validation macro-F1 per question, when they share a validation split."""
    shared = truth_from_splits(members, classes)
    if shared is None:
        return None
    paths, truth = shared
    preds = _aligned([predict_tasks(m, paths, voting.tta) for m in members])
    ok = preds[0].ok
    _, picks, _ = combine(members, _votes(members, preds, voting.method), voting.method, weights,
                          [p.values for p in preds])
    table = {}
    for name, member, probs in [(m.name, m, p.probs) for m, p in zip(members, preds)] + [("ensemble", None, None)]:
        chosen = picks if member is None else choose(member, probs)[0]  # the member's own answer
        row = {q: macro_f1(t[ok], chosen[q], len(classes[q])) for q, t in truth.items() if q in chosen}
        if order and all(q in truth and q in chosen for q in order):
            have = np.all([truth[q][ok] >= 0 for q in order], axis=0)
            if have.any():
                codec = composite_of(order, classes)
                row["composite"] = macro_f1(codec.encode([truth[q][ok] for q in order])[have],
                                            codec.encode([chosen[q] for q in order])[have], len(codec.classes))
        table[name] = row
    return table
