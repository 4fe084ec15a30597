"""Label shift on real data: train on part of the mask sets, then score a held-back part resampled to 80% not_wear.

Groups are split by a hash of their id, so no person or duplicate group is on both sides; the model never sees the
held-back part (its probabilities are calibrated on its own validation split). Prints the true test priors, the training
priors, the EM estimate, and macro-F1 before and after re-weighting.

    python scripts/prior_shift.py --out /tmp/prior-shift            # resnet10t, about 4 minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
from pathlib import Path

import yaml

DATA = Path(os.environ.get("RECIPE_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")).resolve()
SETS = {"maskedfacenet_maskon": "manifest.csv", "face_mask_kaggle3": "crops_manifest.csv",
        "chandrikadeb7_mask2": "manifest.csv"}


def held_back(group: str, share: float = 0.3) -> bool:
    return int(hashlib.blake2b(group.encode(), digest_size=4).hexdigest(), 16) % 1000 < share * 1000


def run_experiment(out: Path, sets=tuple(SETS), backbone: str = "resnet10t", epochs: int = 10, image_size: int = 64,
                   target_share: float = 0.8, per_class: int | None = None, seed: int = 0) -> dict:
    from framework import api

    out.mkdir(parents=True, exist_ok=True)
    seen, back = [], []
    for name in sets:
        with open(DATA / name / SETS[name], newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if per_class:
            taken: dict = {}
            rows = [r for r in rows if taken.setdefault(r["mask_state"], []).append(r) or
                    len(taken[r["mask_state"]]) <= per_class]
        for r in rows:
            row = [str(DATA / name / r["path"]), r["mask_state"], r["group"]]
            (back if held_back(r["group"]) else seen).append(row)
    for file, rows in (("train_part.csv", seen), ("held_back.csv", back)):
        with open(out / file, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", "mask_state", "group"])
            w.writerows(rows)
    # the held-back part, resampled so that `target_share` of it is not_wear
    rng = random.Random(seed)
    by = {}
    for r in back:
        by.setdefault(r[1], []).append(r)
    n_other = round(len(by["not_wear"]) * (1 - target_share) / target_share)
    others = by["wear"] + by["incorrect"]
    shifted = by["not_wear"] + rng.sample(others, min(n_other, len(others)))
    with open(out / "shifted.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "mask_state"])
        w.writerows([r[:2] for r in shifted])
    recipe = {
        "notes": "trained on the non-held-back groups of the mask sets",
        "data": {"root": str(out), "sources": [{"type": "csv", "allow_outside_root": True,
                                                "name": "part", "manifest": "train_part.csv",
                                                "group_column": "group"}],
                 "target": {"column": "mask_state", "classes": ["wear", "incorrect", "not_wear"]}},
        "validation": {"type": "holdout", "ratio": 0.25},
        "transforms": {"image_size": image_size, "train": [{"name": "HorizontalFlip"}, {
            "name": "Affine", "scale": [0.95, 1.05], "translate_percent": [-0.04, 0.04], "rotate": [-8, 8], "p": 0.7}]},
        "model": {"backbone": backbone},
        "train": {"epochs": epochs, "batch_size": 32, "num_workers": 0,
                  "loss": {"name": "cross_entropy", "label_smoothing": 0.1, "class_weights": "auto"}},
        "logging": {"progress": False}, "output": {"root": str(out / "runs")},
    }
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_dir = out / "runs" / "prior-shift"
    if not (run_dir / "checkpoints" / "best.pt").exists():
        run_dir = api.run(out / "recipe.yaml", name="prior-shift", log=lambda *_: None)
    result = api.evaluate(run_dir, out / "shifted.csv", out=out / "evaluation")
    report = json.loads((out / "evaluation" / "metrics.json").read_text())["prior_shift"]["label"]
    return report | {"images": len(shifted), "run": str(run_dir), "report": result["report"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    r = run_experiment(args.out, backbone=args.backbone, epochs=args.epochs)
    fmt = lambda d: ", ".join(f"{k} {v:.3f}" for k, v in d.items())  # noqa: E731
    print(f"held-back images: {r['images']} (calibration: temperature {r['calibration']['temperature']:.2f})")
    print(f"true priors      {fmt(r['true'])}")
    print(f"training priors  {fmt(r['train'])}   L1 {r['l1_train']:.3f}")
    print(f"EM estimate      {fmt(r['estimated'])}   L1 {r['l1_estimated']:.3f}")
    print(f"macro-F1         {r['macro_f1']:.4f} unadjusted -> {r['macro_f1_shifted']:.4f} re-weighted")
    print(f"accuracy         {r['accuracy']:.4f} unadjusted -> {r['accuracy_shifted']:.4f} re-weighted")
    print(f"log-loss         {r['log_loss']:.4f} unadjusted -> {r['log_loss_shifted']:.4f} re-weighted")


if __name__ == "__main__":
    main()
