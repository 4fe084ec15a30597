"""Where one class's errors are: its F1 on the validation images, binned by a numeric column of the data's manifest.

    python scripts/errors_by_column.py runs/kaggle_crops_mask_cv-fold* --cls incorrect \\
        --manifest ../shared/data/face_mask_kaggle3/crops_manifest.csv --column orig_face_w --bins 12,20,30,50

Each run scores its own validation images (`split.csv`) with its kept checkpoint and its own TTA, so the folds of
a cross-validation together score every image once (the rows add up to `recipe crossval`'s pooled counts). Prints,
per bin: images, images of the class, found (true positives), false alarms, missed, and the class's F1.
"""
from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def binned(runs: list[str | Path], manifest: str | Path, column: str, bins: list[float], cls: str,
           task: str | None = None) -> list[dict]:
    """One dict per bin [lo, hi): n, support, tp, fp, fn, f1 of `cls`; images without a value are left out."""
    from framework.inference import predict as P, run as R

    manifest = Path(manifest).resolve()
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not {"path", column} <= set(reader.fieldnames or []):
            raise SystemExit(f"{manifest}: needs the columns 'path' and {column!r} (it has: "
                             f"{', '.join(reader.fieldnames or [])}). Fix: pass --column with one of those.")
        value = {}
        for line, r in enumerate(reader, start=2):
            try:
                value[str((manifest.parent / r["path"]).resolve())] = float(r[column]) if r[column] else None
            except ValueError:
                raise SystemExit(f"{manifest}:{line}: {column} = {r[column]!r} is not a number. Fix: bin by a "
                                 "numeric column, or leave the cell empty to leave that image out.") from None
    edges = [float("-inf"), *sorted(bins), float("inf")]
    out = [dict(lo=lo, hi=hi, n=0, support=0, tp=0, fp=0, fn=0) for lo, hi in zip(edges, edges[1:])]
    for run in runs:
        loaded = R.load_run(run)
        name = task or next(iter(loaded.labels))
        classes = loaded.labels[name].classes
        if cls not in classes:
            raise SystemExit(f"{run}: {cls!r} is not a class of task {name!r} ({', '.join(classes)}).")
        val = [r for r in R.split_rows(loaded, "val") if r.get(name)]
        paths = [r["path"] for r in val]
        pred = P.predict_tasks(loaded, paths, boxes=R.run_boxes(loaded, paths))
        probs, ok = pred.probs, pred.ok
        for k, i in enumerate(ok):
            v = value.get(str(Path(val[i]["path"]).resolve()))
            if v is None:
                continue
            b = next(b for b in out if b["lo"] <= v < b["hi"])
            truth, pred = val[i][name] == cls, classes[probs[name][k].argmax()] == cls
            b["n"] += 1
            b["support"] += truth
            b["tp"] += truth and pred
            b["fp"] += pred and not truth
            b["fn"] += truth and not pred
    for b in out:
        b["f1"] = 2 * b["tp"] / (2 * b["tp"] + b["fp"] + b["fn"]) if b["tp"] + b["fp"] + b["fn"] else float("nan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders (e.g. the folds of one cross-validation)")
    ap.add_argument("--manifest", required=True, help="CSV with a path column (relative to the CSV) and COLUMN")
    ap.add_argument("--column", required=True, help="numeric manifest column to bin by, e.g. orig_face_w")
    ap.add_argument("--bins", required=True, help="inner bin edges, comma-separated, e.g. 12,20,30,50")
    ap.add_argument("--cls", required=True, help="the class to score, e.g. incorrect")
    ap.add_argument("--task", help="the task (default: the run's first)")
    args = ap.parse_args()
    rows = binned(args.runs, args.manifest, args.column, [float(x) for x in args.bins.split(",")], args.cls,
                  args.task)
    print(f"{args.cls} F1 by {args.column} over {len(args.runs)} run(s)")
    print(f"{'bin':>14} {'images':>7} {args.cls:>10} {'found':>6} {'false alarms':>13} {'missed':>7} {'F1':>6}")
    total = {k: sum(r[k] for r in rows) for k in ("n", "support", "tp", "fp", "fn")}
    for r in rows + [dict(lo="all", hi="", f1=2 * total["tp"] / max(1, 2 * total["tp"] + total["fp"] + total["fn"]),
                          **total)]:
        label = "all" if r["lo"] == "all" else f"[{r['lo']:g}, {r['hi']:g})"
        print(f"{label:>14} {r['n']:>7} {r['support']:>10} {r['tp']:>6} {r['fp']:>13} {r['fn']:>7} {r['f1']:>6.3f}")


if __name__ == "__main__":
    main()
