"""A folder shaped like the mask contest's data, built from the real images in ../shared/data (never committed):

    OUT/train/images/<ID>_<gender>_Asian_<age>/mask1..mask5.jpg, incorrect_mask.jpg, normal.jpg
    OUT/eval/images/<ImageID>.jpg      OUT/eval/info.csv (ImageID,ans: ans 0, as the contest hands it out)
    OUT/eval/labels.csv                (path,mask_state,gender,age: the truth of the eval images, for evaluate)

What is real and what is assembled:
- Each person's gender and age are real labels of one UTKFace face, and their `normal` image is that face.
- Their `mask1..5` and `incorrect_mask` images are real MaskedFace-Net photos (worn / incorrectly worn masks) of
  OTHER people: the data set has no gender or age labels, so a person's masked images do not show them. A model
  can learn mask state from every image, but gender and age only from the `normal` one. Figures on this fixture
  test the path, not the contest.
- The race field is a constant (`Asian`, as in the contest's data); person IDs are made up.
- The persons are balanced over gender x age band (<30, 30-59, 60+); the eval persons are other UTKFace faces and
  other MaskedFace-Net photos than the training persons' (no image is in both).

    python scripts/make_contest_fixture.py OUT [--persons 36] [--eval-persons 6] [--seed 0]
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
from pathlib import Path

DATA = Path(os.environ.get("RECIPE_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")).resolve()
BANDS = [(0, 30), (30, 60), (60, 200)]


def _rows(name: str) -> list[dict]:
    with open(DATA / name / "manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _faces(n: int, rng: random.Random) -> list[dict]:
    """n UTKFace faces, balanced over gender x age band, one per group (person)."""
    cells: dict[tuple, list[dict]] = {}
    seen = set()
    for r in _rows("utkface_subset"):
        band = next(i for i, (lo, hi) in enumerate(BANDS) if lo <= int(r["age"]) < hi)
        if r["group"] not in seen and r["gender"] in ("male", "female"):
            seen.add(r["group"])
            cells.setdefault((r["gender"], band), []).append(r)
    for v in cells.values():
        rng.shuffle(v)
    out, k = [], 0
    while len(out) < n:
        for key in sorted(cells):
            if k < len(cells[key]) and len(out) < n:
                out.append(cells[key][k])
        k += 1
    return out


def _masked(rng: random.Random) -> dict[str, list[str]]:
    by_state: dict[str, list[str]] = {"wear": [], "incorrect": []}
    for r in _rows("maskedfacenet_maskon"):
        if r["mask_state"] in by_state:
            by_state[r["mask_state"]].append(str(DATA / "maskedfacenet_maskon" / r["path"]))
    for v in by_state.values():
        rng.shuffle(v)
    return by_state


def build(out: Path, persons: int = 36, eval_persons: int = 6, seed: int = 0) -> Path:
    rng = random.Random(seed)
    faces, masked = _faces(persons + eval_persons, rng), _masked(rng)
    need = {"wear": 5 * len(faces), "incorrect": len(faces)}
    if any(len(masked[s]) < n for s, n in need.items()):
        raise SystemExit(f"not enough MaskedFace-Net images for {len(faces)} persons: {need}")
    (out / "train" / "images").mkdir(parents=True)
    (out / "eval" / "images").mkdir(parents=True)
    info, labels = [], []
    for k, face in enumerate(faces):
        images = {f"mask{j}": masked["wear"].pop() for j in range(1, 6)} | {"incorrect_mask": masked["incorrect"].pop(),
                                                                          "normal": str(DATA / "utkface_subset" / face["path"])}
        if k < persons:
            person = out / "train" / "images" / f"{k:06d}_{face['gender']}_Asian_{int(face['age'])}"
            person.mkdir()
            for name, src in images.items():
                shutil.copy(src, person / f"{name}.jpg")
            continue
        for name, src in images.items():  # eval: anonymous image names, the truth kept aside
            image_id = f"{rng.getrandbits(40):010x}.jpg"
            shutil.copy(src, out / "eval" / "images" / image_id)
            info.append([image_id, 0])
            state = "wear" if name.startswith("mask") else ("incorrect" if name == "incorrect_mask" else "not_wear")
            labels.append([f"images/{image_id}", state, face["gender"], int(face["age"])])
    _write(out / "eval" / "info.csv", ["ImageID", "ans"], info)
    _write(out / "eval" / "labels.csv", ["path", "mask_state", "gender", "age"], labels)
    return out


def _write(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--persons", type=int, default=36)
    ap.add_argument("--eval-persons", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(f"wrote {build(a.out, a.persons, a.eval_persons, a.seed)}")
