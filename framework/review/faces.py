"""Face boxes looked at before training: `recipe faces` writes the boxes a detector finds as a manifest with box
columns (check them, fix a few by hand, train from boxes in the data), and `recipe inspect` counts where boxes come
from and draws a contact sheet of the detections."""
from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageDraw

from framework.data.dataset import ImageError, decode
from framework.errors import Issue, RunError

BOX_COLUMNS = ["xmin", "ymin", "xmax", "ymax"]
COLOURS = {"data": (40, 170, 60), "detector": (240, 180, 0), "none": (220, 40, 40)}


def find_boxes(rows: list[dict], detector, threads: int = 2) -> tuple[list, list[str]]:
    """Each row's face box and where it came from: its own (`box`, from the data), the detector's, or none (also
    for an unreadable image). Images with a box from the data are not decoded."""
    def one(row):
        if row.get("box"):
            return tuple(row["box"]), "data"
        try:
            box = detector(decode(row["path"]))
        except ImageError:
            return None, "none"
        return (box, "detector") if box is not None else (None, "none")

    with ThreadPoolExecutor(max(1, threads)) as pool:
        found = list(pool.map(one, rows))
    return [b for b, _ in found], [o for _, o in found]


def detection_sheet(rows: list[dict], boxes: list, origins: list[str], out: Path, count: int = 48,
                    tile: int = 128) -> Path:
    """A contact sheet of up to `count` images with their face box drawn (green: from the data, amber: detected,
    red frame: none); images the detector searched come first."""
    order = sorted(range(len(rows)), key=lambda i: origins[i] == "data")[:count]
    cols = 8
    sheet = Image.new("RGB", (cols * (tile + 4), ((len(order) + cols - 1) // cols) * (tile + 16) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for n, i in enumerate(order):
        try:
            im = Image.fromarray(decode(rows[i]["path"]))
        except ImageError:
            continue
        scale = tile / max(im.size)
        small = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
        x, y = (n % cols) * (tile + 4), (n // cols) * (tile + 16)
        sheet.paste(small, (x, y))
        colour = COLOURS[origins[i]]
        if boxes[i] is not None:
            x0, y0, x1, y1 = (min(max(v, 0), side) * scale for v, side in zip(boxes[i], (*im.size, *im.size)))
            draw.rectangle([x + x0, y + y0, x + x1, y + y1], outline=colour, width=2)
        else:
            draw.rectangle([x, y, x + small.width - 1, y + small.height - 1], outline=colour, width=3)
        draw.text((x + 2, y + tile + 2), f"{origins[i]} {Path(rows[i]['path']).name[:18]}", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def read_images(target: str | Path) -> tuple[list[dict], list[str]]:
    """The rows of a folder of images or of a CSV with a `path` column (relative to the CSV's folder), with the
    CSV's own columns kept; returns (rows, columns)."""
    from framework.inference.run import list_images

    target = Path(target)
    if target.is_dir():
        images = list_images(images=target)
        return [{"path": p} for p in images.paths], ["path"]
    if target.suffix.lower() != ".csv":
        raise RunError(Issue(f"{target} is neither a folder of images, a CSV nor a recipe.", field="TARGET",
                             fix="give a recipe (.yaml), a folder of images, or a CSV with a `path` column."))
    images = list_images(csv_file=target)
    rows = [dict(r, path=p) for r, p in zip(images.rows, images.paths)]
    return rows, images.header or ["path"]


def write_manifest(rows: list[dict], columns: list[str], boxes: list, origins: list[str], out: Path) -> Path:
    """The rows with box columns (empty where no face was found) and `box_from` (data / detector / none)."""
    keep = [c for c in columns if c not in BOX_COLUMNS + ["box_from"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(keep + BOX_COLUMNS + ["box_from"])
        for row, box, origin in zip(rows, boxes, origins):
            coords = [f"{v:.1f}" for v in box] if box is not None else [""] * 4
            w.writerow([row.get(c, "") for c in keep] + coords + [origin])
    return out


def summary(origins: list[str]) -> dict[str, int]:
    return {o: origins.count(o) for o in ("data", "detector", "none")}


def faces_of(target: str | Path, out: Path, overrides: list[str], detector_name: str | None = None,
             sheet: Path | None = None) -> dict:
    """`recipe faces`: the boxes of every image of a recipe (its detector unless `detector_name`; boxes from the
    data kept), a folder of images or a CSV, written to `out` as a manifest; returns the counts and paths."""
    import os

    from framework.data import faces

    rows, columns, name = _target_rows(Path(target), overrides, detector_name)
    missing = faces.missing_package(name)
    if missing:
        raise RunError(Issue(missing[0], field="--detector", fix=missing[1]))
    from types import SimpleNamespace

    detector = faces.detector(SimpleNamespace(name=name, args={}))
    boxes, origins = find_boxes(rows, detector, threads=os.cpu_count() or 2)
    written = write_manifest(_relative(rows, out.parent), columns, boxes, origins, out)
    result = {"out": str(written), "detector": detector.name, "images": len(rows), "counts": summary(origins)}
    if sheet is not None:
        result["sheet"] = str(detection_sheet(rows, boxes, origins, sheet))
    return result


def _target_rows(target: Path, overrides: list[str], detector_name: str | None):
    """(rows, columns, detector name) of a recipe (its sources' rows and columns), a folder or a CSV."""
    if target.suffix.lower() not in (".yaml", ".yml"):
        rows, columns = read_images(target)
        return rows, columns, detector_name or "auto"
    from framework.data.readers import read_sources
    from framework.recipe.loaded import load_recipe

    loaded = load_recipe(target, overrides)
    with loaded.errors_located():
        rows = read_sources(loaded.recipe.data)
    columns = list(dict.fromkeys(k for r in rows for k in r if k not in ("box", "_line")))
    return rows, columns, detector_name or loaded.recipe.transforms.face_detector.name


def _relative(rows: list[dict], folder: Path) -> list[dict]:
    """Paths relative to the manifest's folder where the image is inside it (a manifest's default root), else
    absolute (the source then needs `allow_outside_root: true` or a `root`)."""
    base = folder.resolve()
    out = []
    for r in rows:
        p = Path(r["path"]).resolve()
        out.append({**r, "path": str(p.relative_to(base)) if p.is_relative_to(base) else str(p)})
    return out
