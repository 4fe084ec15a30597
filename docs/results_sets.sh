#!/usr/bin/env bash
# docs/results.md, "One recipe per set": each set's recipe (one after the other, so the wall times are those of a
# machine doing nothing else), the compare sheet, each model on a set it never saw, and one Grad-CAM sheet per set.
# 12-16 minutes on 2 CPU cores. Run folders of these names must not exist yet.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="maskon_mask chandrikadeb7_mask utk_gender_age kaggle_crops_mask kaggle_crops_mask_utk_pretrained"
for r in $runs; do
  recipe run "recipes/$r.yaml" --name "$r"      # the pretrained kaggle recipe reads runs/utk_gender_age's weights
done
recipe compare $(printf 'runs/%s ' $runs) --baseline runs/kaggle_crops_mask --format md --out runs/sets.md
recipe evaluate runs/maskon_mask --recipe-data recipes/kaggle_crops_mask.yaml --out runs/maskon_mask/on_kaggle
recipe evaluate runs/chandrikadeb7_mask --recipe-data recipes/kaggle_crops_mask.yaml --out runs/chandrikadeb7_mask/on_kaggle
bash docs/gradcam_sets.sh maskon_mask chandrikadeb7_mask utk_gender_age kaggle_crops_mask
