"""Helpers shared by the benchmarks: real images from ../shared/data, timing side by side."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # as the `recipe` command does (before torch loads)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RECIPE_TEST_DATA", REPO.parent / "shared" / "data")).resolve()


def real_photos(n: int) -> list[Path]:
    """n real photos (mask portraits, web photos and face chips), in a fixed order."""
    folders = [DATA / "maskedfacenet_maskon" / "images", DATA / "chandrikadeb7_mask2" / "with_mask",
               DATA / "chandrikadeb7_mask2" / "without_mask", DATA / "utkface_subset" / "images"]
    files = [sorted(f.iterdir()) for f in folders]
    out = []
    while len(out) < n:
        for group in files:
            if group:
                out.append(group.pop(0))
    return out[:n]


def contest_sized(photos: list[Path], folder: Path, classes: int = 2) -> list[tuple[str, int]]:
    """The photos re-encoded as 384x512 JPEGs (the contest's size), one sub-folder per class."""
    from PIL import Image

    out = []
    for i, p in enumerate(photos):
        label = i % classes
        target = folder / f"class{label}" / f"{i:05d}.jpg"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(p) as im:
                im.convert("RGB").resize((384, 512), Image.BICUBIC).save(target, quality=90)
        out.append((str(target), label))
    return out


def timed(fn, repeat: int = 3) -> list[float]:
    """Wall seconds of `repeat` calls of fn."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(xs) -> float:
    return statistics.median(xs)


def parser(description: str):
    """An argument parser with `--smoke`: tiny sizes and one round, so that CI runs every benchmark (a benchmark
    nothing runs rots); the figures of a smoke run mean nothing."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--smoke", action="store_true", help="Tiny sizes, one round: checks that the script runs.")
    return ap


def loader_setup(description: str, size: int = 128):
    """Shared set-up of the loader benchmarks: arguments, the contest-sized photos, and recipe's soft pipeline.

    Returns (args, folder of photos, rows, labels, resize stage, augmentation stage)."""
    import tempfile

    import torch

    from framework import transforms as T
    from framework.recipe.loaded import load_recipe

    ap = parser(description)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--size", type=int, default=size, help="Output size of the resize stage (px).")
    args = ap.parse_args()
    size = args.size
    if args.smoke:
        args.images, args.epochs, size = 16, 1, 32
    args.size = size
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="recipe-bench-"))
    photos = contest_sized(real_photos(args.images), tmp / "photos")
    rows, labels = [{"path": p} for p, _ in photos], [(y,) for _, y in photos]
    recipe = load_recipe(REPO / "recipes" / "soft_aug.yaml", [f"transforms.image_size={size}"]).recipe
    resize = T.resize_stage((size, size), recipe.transforms.resize)
    augment = T.augmentation_stage(T.build_augmentations(recipe.transforms, (size, size)))
    return args, tmp, rows, labels, resize, augment


def built_run(recipe_dict: dict):
    """A recipe's built run (framework.build.build_run) on its data plan, in a throw-away folder."""
    import tempfile

    from framework.build import build_data, build_run
    from framework.recipe.schema import Recipe

    recipe = Recipe.model_validate(recipe_dict)
    return build_run(recipe, build_data(recipe), Path(tempfile.mkdtemp()), [])


def utk_gender(backbone: str, size: int, batch: int, **model) -> dict:
    """The benchmarks' training recipe: UTKFace gender at `size` px, no augmentation, no logging."""
    return {"data": {"root": str(DATA), "sources": [{"type": "csv", "name": "utk",
                                                     "manifest": "utkface_subset/manifest.csv", "group_column": "group"}],
                     "target": {"column": "gender"}},
            "validation": {"type": "holdout", "ratio": 0.5}, "transforms": {"image_size": size, "train": []},
            "model": {"backbone": backbone, **model}, "train": {"batch_size": batch, "num_workers": 0, "epochs": 10},
            "logging": {"trackers": [], "progress": False}}
