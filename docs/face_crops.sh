#!/usr/bin/env bash
# docs/results.md, "Face crops from a detector": recipes/chandrikadeb7_mask.yaml (web photos, no face boxes in the
# data) trained on the whole image, and on face crops (resize.face_margin: 0.25) whose boxes come from haar and
# from mtcnn; the same recipe otherwise, on two grouped splits. About 10 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/face-crops}
for seed in 0 1; do
  common=(--set "output.root=$out" --set logging.progress=false --set validation.seed=$seed)
  recipe run recipes/chandrikadeb7_mask.yaml "${common[@]}" --name whole-split$seed
  for detector in haar mtcnn; do
    recipe run recipes/chandrikadeb7_mask.yaml "${common[@]}" --set transforms.resize.face_margin=0.25 \
      --set transforms.face_detector=$detector --name $detector-split$seed
  done
done
recipe compare "$out" --format md --out "$out/sheet.md"
