#!/usr/bin/env bash
# docs/results.md, "A real study (recipe tune)": the study of recipes/chandrikadeb7_mask_tune.yaml, the shipped
# recipe on the same validation images, the best trial trained again, both on two other splits, and what pruning
# saved: every pruned trial, copied, resumed to its last epoch (the same trials run to the end). About 30 minutes
# on 2 CPU cores. OUT (default runs/tune-study) must not hold a study of this name yet.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/tune-study}
common=(--set "output.root=$out" --set logging.progress=false)
time recipe tune recipes/chandrikadeb7_mask_tune.yaml "${common[@]}"
best="$out/chandrikadeb7-f1-tune/best.yaml"
recipe run recipes/chandrikadeb7_mask.yaml "${common[@]}" --name shipped
recipe run "$best" --name best-again
for seed in 1 2; do  # splits the study never saw (other persons in validation)
  recipe run recipes/chandrikadeb7_mask.yaml "${common[@]}" --set validation.seed=$seed --name shipped-split$seed
  recipe run "$best" --set validation.seed=$seed --name best-split$seed
done
python - "$out" <<'PY'
import json, shutil, subprocess, sys, time
from pathlib import Path
out = Path(sys.argv[1])
pruned = sorted(p for p in out.glob("chandrikadeb7-f1-t[0-9]*")
                if json.loads((p / "summary.json").read_text())["status"] == "pruned")
rows, ran, left = [], 0.0, 0.0
for p in pruned:
    s = json.loads((p / "summary.json").read_text())
    full = p.with_name(p.name + "-full")
    shutil.copytree(p, full)
    started = time.perf_counter()
    subprocess.run(["recipe", "run", "--resume", str(full)], check=True, capture_output=True)
    rest = time.perf_counter() - started
    f = json.loads((full / "summary.json").read_text())
    ran, left = ran + s["wall_seconds"], left + rest
    rows.append(f"| {p.name} | {s['pruned']['epoch']} | {s['best_value']:.4f} | {s['wall_seconds']:.0f} | {rest:.0f} "
                f"| {f['best_value']:.4f} |")
print("| trial | pruned at epoch | best val/macro_f1 when pruned | seconds run | seconds to the end | best when run to the end |")
print("|---|---:|---:|---:|---:|---:|")
print("\n".join(rows))
print(f"pruned trials: {len(pruned)}; they ran {ran:.0f} s; running them to the end took {left:.0f} s more")
PY
recipe compare "$out" --format md --out "$out/sheet.md"
