"""Validation policies: stratified, grouped holdout and k-fold, a source as validation, a split file.

Every policy returns one `side` per row ("train" / "val"; "unused" for rows left out, see build_split). Grouped
splits assign whole groups, largest first, each to the side (or fold) whose per-class count is furthest below its
target, so each class lands within one group of its share - and, with groups of one image, exactly on it.
"""
from __future__ import annotations

import hashlib
import os
import random
import stat
from collections import Counter, defaultdict
from pathlib import Path

from framework.errors import DataError, FieldError


def _largest_remainder(total: int, shares: list[float]) -> list[int]:
    raw = [total * s for s in shares]
    out = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def _targets(class_totals: dict, shares: list[float]) -> dict:
    """Integer targets per (bin, class) whose bin sums also follow `shares` as closely as integers allow."""
    n_bins = len(shares)
    grand = sum(class_totals.values())
    bin_totals = _largest_remainder(grand, shares)
    targets = {b: {} for b in range(n_bins)}
    filled = [0] * n_bins
    # Classes in a fixed order; each class's remainders go to the bins that are furthest below their total.
    for c in sorted(class_totals, key=str):
        n = class_totals[c]
        base = [int(n * s) for s in shares]
        rest = n - sum(base)
        # remainders go to the largest fractional shares, ties to the bin furthest below its own total
        order = sorted(range(n_bins), key=lambda b: (-round(n * shares[b] - base[b], 9),
                                                      -(bin_totals[b] - filled[b] - base[b]), b))
        for b in order[:rest]:
            base[b] += 1
        for b in range(n_bins):
            targets[b][c] = base[b]
            filled[b] += base[b]
    return targets


def assign_groups(strata: list, groups: list, shares: list[float], seed: int) -> list[int]:
    """A bin index per row: whole groups per bin, per-stratum counts close to `shares`."""
    members: dict = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    class_totals = Counter(strata)
    targets = _targets(class_totals, shares)
    counts = {b: Counter() for b in range(len(shares))}
    order = list(members)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -len(members[g]))  # stable: big groups first, ties in seeded random order
    out = [0] * len(groups)
    for g in order:
        need = Counter(strata[i] for i in members[g])

        def cost(b):  # growth of the squared distance to the targets if the group joins bin b
            return sum(k * (2 * (counts[b][c] - targets[b][c]) + k) for c, k in need.items())

        best = min(range(len(shares)), key=lambda b: (cost(b), sum(counts[b].values()) / max(shares[b], 1e-9), b))
        counts[best].update(need)
        for i in members[g]:
            out[i] = best
    return out


def _strata(rows, y, stratify) -> list:
    if stratify is True:
        return list(y)
    if stratify is False:
        return [0] * len(rows)
    return [r.get(stratify, "") for r in rows]


def _groups(rows, group_by) -> list:
    if group_by is None:
        return list(range(len(rows)))
    return [r.get(group_by) or f"row{i}" for i, r in enumerate(rows)]


def build_split(rows: list[dict], y: list[int], policy, train_only: frozenset | set = frozenset()) -> list[str]:
    """`train` / `val` for each row, following the recipe's validation policy.

    Rows of `train_only` sources (extra training data) take no part in the policy, so the other sources' split is
    the same with or without them. With `per_source`, each source is split on its own, as a recipe of that source
    alone would split it. Either way a row that would train while its group is validated in another part of the
    data is `unused` (a leak), never trained on."""
    if policy.type == "source" and policy.source in train_only:
        raise FieldError(("validation", "source"), f"source {policy.source!r} is `train_only`, so it cannot be the "
                         "validation set.", f"drop train_only from {policy.source!r}, or validate on another source.",
                         DataError)
    parts = _parts(rows, train_only, getattr(policy, "per_source", False))
    if len(parts) == 1 and len(parts[0]) == len(rows):
        return _policy_split(rows, y, policy)
    sides = ["train"] * len(rows)
    part_of = [-1] * len(rows)  # -1: a train_only row
    for n, part in enumerate(parts):
        for i, side in zip(part, _policy_split([rows[i] for i in part], [y[i] for i in part], policy)):
            sides[i], part_of[i] = side, n
    group_by = getattr(policy, "group_by", "group")
    if group_by:
        val_parts: dict = defaultdict(set)  # group -> the parts that validate it
        for i, r in enumerate(rows):
            if sides[i] == "val" and r.get(group_by):
                val_parts[r[group_by]].add(part_of[i])
        for i, r in enumerate(rows):
            if sides[i] == "train" and val_parts.get(r.get(group_by), set()) - {part_of[i]}:
                sides[i] = "unused"
    return sides


def _parts(rows: list[dict], train_only, per_source: bool) -> list[list[int]]:
    """The row indices the policy splits at once: every row not in a train_only source, or each source's rows."""
    keep = [i for i, r in enumerate(rows) if r["source"] not in train_only]
    if not per_source:
        return [keep]
    by_source: dict = defaultdict(list)
    for i in keep:
        by_source[rows[i]["source"]].append(i)
    return list(by_source.values())


def _policy_split(rows: list[dict], y: list[int], policy) -> list[str]:
    if policy.type in ("holdout", "kfold"):
        if policy.group_by is not None and policy.group_by != "group" and any(policy.group_by not in r for r in rows):
            raise FieldError(("validation", "group_by"), f"column {policy.group_by!r} is not in every source.",
                             "name a column of the data, `group`, or null.", DataError)
        if isinstance(policy.stratify, str) and any(policy.stratify not in r for r in rows):
            raise FieldError(("validation", "stratify"), f"column {policy.stratify!r} is not in every source.",
                             "use true (the target), false, or a column of the data.", DataError)
        strata, groups = _strata(rows, y, policy.stratify), _groups(rows, policy.group_by)
        if policy.type == "holdout":
            bins = assign_groups(strata, groups, [1 - policy.ratio, policy.ratio], policy.seed)
            return ["val" if b == 1 else "train" for b in bins]
        bins = assign_groups(strata, groups, [1 / policy.k] * policy.k, policy.seed)
        return ["val" if b == policy.fold else "train" for b in bins]
    if policy.type == "source":
        names = sorted({r["source"] for r in rows})
        if policy.source not in names:
            from framework.errors import did_you_mean
            raise FieldError(("validation", "source"), f"no data source is named {policy.source!r}."
                             f"{did_you_mean(policy.source, names)}", f"sources: {', '.join(names)}.", DataError)
        return ["val" if r["source"] == policy.source else "train" for r in rows]
    return _from_file(rows, Path(policy.path))


def kfold_assignment(rows, y, policy) -> list[int]:
    """The fold of every row (for reports and `--all-folds`)."""
    return assign_groups(_strata(rows, y, policy.stratify), _groups(rows, policy.group_by),
                         [1 / policy.k] * policy.k, policy.seed)


def _from_file(rows: list[dict], path: Path) -> list[str]:
    from framework.data.readers import read_table

    if not path.is_file():
        raise FieldError(("validation", "path"), f"split file not found: {path}.",
                         "give a CSV with columns path and split (e.g. a run's split.csv).", DataError)
    header, table = read_table(path, ("validation", "path"))
    if not {"path", "split"} <= set(header):
        raise FieldError(("validation", "path"), f"{path.name} needs columns path and split, has "
                         f"{header}.", "write a CSV with columns path,split.", DataError)
    side = {str(Path(r["path"] or "")): (r["split"] or "").strip() for r in table}
    bad = sorted({s for s in side.values() if s not in ("train", "val", "unused")})
    if bad:
        raise FieldError(("validation", "path"), f"{path.name}: split values {bad} are not train/val/unused.",
                         "use `train`, `val` or `unused` (left out) in the split column.", DataError)
    missing = [r["path"] for r in rows if r["path"] not in side]
    if missing:
        raise FieldError(("validation", "path"), f"{len(missing)} images are not in {path.name}, e.g. "
                         f"{missing[0]}.", "list every image of the data in the split file.", DataError)
    return [side[r["path"]] for r in rows]


def audit(rows: list[dict], sides: list[str], group_by: str | None = "group") -> tuple[list[str], list[tuple]]:
    """Leakage audit: groups on both sides (returned as errors) and byte-identical files on both sides (warned).

    Only files whose sizes match one on the other side are hashed, so the audit reads little."""
    errors = []
    used = [i for i, s in enumerate(sides) if s in ("train", "val")]  # `unused` rows neither train nor validate
    rows, sides = [rows[i] for i in used], [sides[i] for i in used]
    if group_by:
        seen: dict = defaultdict(set)
        for r, s in zip(rows, sides):
            if r.get(group_by):
                seen[r[group_by]].add(s)
        leaked = sorted(g for g, s in seen.items() if len(s) > 1)
        if leaked:
            errors.append(f"{len(leaked)} group(s) of column {group_by!r} sit on both sides of the split, "
                          f"e.g. {leaked[:3]}")
    by_size: dict = defaultdict(lambda: {"train": [], "val": []})
    for r, s in zip(rows, sides):
        try:
            st = os.stat(r["path"])
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):  # (a pipe or device is reported when it is decoded, never read here)
            by_size[st.st_size][s].append(r["path"])
    dupes = []
    for sides_ in by_size.values():
        if sides_["train"] and sides_["val"]:
            hashes = defaultdict(lambda: {"train": [], "val": []})
            for s, paths in sides_.items():
                for p in paths:
                    hashes[_digest(p)][s].append(p)
            dupes += [(h["train"][0], h["val"][0]) for h in hashes.values() if h["train"] and h["val"]]
    return errors, dupes


def _digest(path: str) -> str:
    """The file's content hash, read in blocks; a file too large to be an image (it fails to decode) is its own
    path, never read."""
    from framework.data.dataset import MAX_IMAGE_BYTES

    if os.path.getsize(path) > MAX_IMAGE_BYTES:
        return f"(too large) {path}"
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_split(path: Path, plan) -> None:
    """split.csv: every image with its source, group, side and each task's label (empty where it has none); a task
    cut into bands from a number (age) keeps the number too (`<task>_value`), so its bands can be moved later."""
    import math

    from framework.io import write_csv

    tasks, numbered = list(plan.labels), list(plan.numbers)
    write_csv(path, ["path", "source", "group", "split"] + tasks + [f"{t}_value" for t in numbered],
              ([r["path"], r["source"], r.get("group", ""), s]
               + [plan.labels[t].classes[plan.ys[t][i]] if plan.ys[t][i] >= 0 else "" for t in tasks]
               + ["" if math.isnan(plan.numbers[t][i]) else f"{plan.numbers[t][i]:g}" for t in numbered]
               for i, (r, s) in enumerate(zip(plan.rows, plan.sides))))