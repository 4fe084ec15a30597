"""Helpers shared by the benchmarks: real images from ../shared/data, timing side by side."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
