#!/usr/bin/env bash
# One Grad-CAM contact sheet per run (docs/gradcam_<run>.png): 8 validation images, two per class where the class
# has them, explained by the run's best checkpoint. Runs that crop to faces are shown on the face region (boxes
# from the run's own data). Needs the runs in runs/ (docs/results.md gives the commands).
#   bash docs/gradcam_sets.sh maskon_mask chandrikadeb7_mask kaggle_crops_mask utk_gender_age
set -euo pipefail
cd "$(dirname "$0")/.."
for run in "$@"; do
  list="runs/$run/explain_images.csv"
  python - "runs/$run/split.csv" "$list" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1], newline="", encoding="utf-8")) if r["split"] == "val"]
label = [c for c in rows[0] if c not in ("path", "source", "group", "split")][0]
picked, seen = [], {}
for r in rows:  # the first two validation images of each class, in file order
    if seen.get(r[label], 0) < 2:
        seen[r[label]] = seen.get(r[label], 0) + 1
        picked.append(r["path"])
picked += [r["path"] for r in rows if r["path"] not in picked]
with open(sys.argv[2], "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows([["path"]] + [[p] for p in picked[:8]])
PY
  recipe explain "runs/$run" "$list" --out "runs/$run/explain"
  cp "runs/$run/explain/contact_sheet.png" "docs/gradcam_$run.png"
done
