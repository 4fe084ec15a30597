#!/usr/bin/env bash
# One model with three heads vs three single-task models, on the mask sets + UTKFace in ../shared/data.
# The single-task runs reuse the three-head run's split (validation type file), so every task is scored on
# the same validation images. About 15 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
R=recipes/multitask_mask_utk.yaml
recipe run $R --name mt-3heads
split="{type: file, path: runs/mt-3heads/split.csv}"
recipe run $R --name mt-mask-only --set "validation=$split" \
  --set "tasks={mask: {column: mask_state, classes: [wear, incorrect, not_wear], loss: {name: cross_entropy, class_weights: auto}}}"
recipe run $R --name mt-gender-only --set "validation=$split" --set "tasks={gender: {column: gender, classes: [male, female]}}"
recipe run $R --name mt-age-only --set "validation=$split" --set "tasks={age: {column: age, bins: [30, 60]}}"
recipe ensemble runs/mt-mask-only runs/mt-gender-only runs/mt-age-only --method soft \
  --csv runs/mt-3heads/split.csv --out runs/three-models.csv
