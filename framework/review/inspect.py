"""`recipe inspect`: look at a recipe's data before training - counts per split and source, the leakage audit,
odd and unreadable files, image sizes, and a preview of what the resize and the augmentations do."""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from framework.data.dataset import ImageError, decode
from framework.data.labels import LabelSet
from framework.io import atomic_write_text, write_json

_FORMAT_EXT = {"JPEG": {".jpg", ".jpeg"}, "PNG": {".png"}, "WEBP": {".webp"}, "BMP": {".bmp"}, "GIF": {".gif"},
               "TIFF": {".tif", ".tiff"}}


def file_facts(path: str) -> dict:
    """Format, mode and size from the header (no decoding), and what is odd about the file."""
    facts = {"path": path, "odd": []}
    name = Path(path).name
    if not name.isascii():
        facts["odd"].append("non-ASCII name")
    if " " in name:
        facts["odd"].append("space in name")
    try:
        with Image.open(path) as im:
            facts.update(format=im.format, mode=im.mode, width=im.width, height=im.height,
                         exif_rotated=im.getexif().get(0x0112, 1) not in (1, None))
    except Exception as e:  # noqa: BLE001 - any header failure is reported as unreadable
        facts["error"] = f"{type(e).__name__}: {e}"
        return facts
    ext = Path(path).suffix.lower()
    if facts["format"] in _FORMAT_EXT and ext not in _FORMAT_EXT[facts["format"]]:
        facts["odd"].append(f"{facts['format']} data behind a {ext or 'missing'} extension")
    if facts["mode"] not in ("RGB",):
        facts["odd"].append({"P": "palette", "RGBA": "alpha channel", "LA": "grey + alpha", "L": "greyscale",
                             "CMYK": "CMYK", "I;16": "16-bit", "I": "32-bit"}.get(facts["mode"], f"mode {facts['mode']}"))
    if min(facts["width"], facts["height"]) < 32:
        facts["odd"].append(f"tiny ({facts['width']}x{facts['height']})")
    if max(facts["width"], facts["height"]) > 4000:
        facts["odd"].append(f"very large ({facts['width']}x{facts['height']})")
    if facts["exif_rotated"]:
        facts["odd"].append("EXIF rotation")
    return facts


def inspect_recipe(path: str | Path, overrides=(), out: str | Path | None = None, samples: int = 6,
                   draws: int = 5, decode_all: bool = True) -> dict:
    """Everything `recipe inspect` reports, as a dict; writes report.json, report.txt and augmentations.png."""
    from framework.build import label_rows
    from framework.data.readers import read_sources
    from framework.data.splits import audit, build_split
    from framework.recipe.loaded import load_recipe

    loaded = load_recipe(path, overrides)
    recipe = loaded.recipe
    with loaded.errors_located():
        rows = read_sources(recipe.data)
        rows, ys, labels, dropped = label_rows(rows, recipe.task_specs(), recipe.data.missing_label,
                                               recipe.tasks is not None)
        keys = list(zip(*ys.values()))
        strata_ids = {k: n for n, k in enumerate(sorted(set(keys)))}
        sides = build_split(rows, [strata_ids[k] for k in keys], recipe.validation, recipe.data.train_only)
    leaks, dupes = audit(rows, sides, getattr(recipe.validation, "group_by", "group"))
    with ThreadPoolExecutor(8) as pool:
        facts = list(pool.map(file_facts, [r["path"] for r in rows]))
    unreadable = _unreadable(rows, facts, decode_all)
    sizes = np.array([(f["width"], f["height"]) for f in facts if "width" in f]) if facts else np.zeros((0, 2))
    report = {
        "recipe": str(path), "images": len(rows), "dropped_without_label": dropped,
        "counts": _counts(rows, sides, ys, labels),
        "leakage": {"groups_on_both_sides": leaks, "identical_files_on_both_sides": [list(d) for d in dupes]},
        "unreadable": [list(u) for u in unreadable],
        "odd_files": [{"path": f["path"], "odd": f["odd"]} for f in facts if f["odd"]],
        "sizes": _size_summary(sizes),
    }
    found = _faces(loaded, rows, sides, [_label(labels, ys, i) for i in range(len(rows))], out)
    if found is not None:
        report["faces"] = found
    if out is not None:
        out = Path(out)
        write_json(out / "report.json", report)
        atomic_write_text(out / "report.txt", format_report(report) + "\n")
        ok = [i for i, f in enumerate(facts) if "error" not in f and f["path"] not in dict(unreadable)]
        train_ok = [i for i in ok if sides[i] == "train"] or ok
        picks = [train_ok[int(k)] for k in np.linspace(0, len(train_ok) - 1, min(samples, len(train_ok)))]
        preview = augmentation_preview(recipe, [rows[i] for i in picks], [_label(labels, ys, i) for i in picks], draws)
        Image.fromarray(preview).save(out / "augmentations.png")
        report["preview"] = str(out / "augmentations.png")
    return report


def _faces(loaded, rows: list[dict], sides: list[str], classes: list[str], out) -> dict | None:
    """Where face boxes come from when the recipe needs them (face crop, face-keeping augmentation): counts per
    side, source and class, and (with `out`) detections.png; None when nothing looks at faces."""
    from framework import transforms as T
    from framework.data import faces
    from framework.backbones import resolve_inputs
    from framework.resolve import check_face_detector
    from framework.review.faces import detection_sheet, find_boxes

    recipe = loaded.recipe
    with loaded.errors_located():
        check_face_detector(recipe)
        size, _, _ = resolve_inputs(recipe)
        augs = T.build_augmentations(recipe.transforms, size)
    if recipe.transforms.resize.face_margin is None and not T.needs_face_box(augs):
        return None
    detector = faces.for_recipe(recipe)
    boxes, origins = find_boxes(rows, detector)
    counts = faces.box_counts(rows, boxes, sides, classes, detector)
    if out is not None:
        counts["sheet"] = str(detection_sheet(rows, boxes, origins, Path(out) / "detections.png"))
    return counts


def _counts(rows, sides, ys, labels) -> dict:
    """counts[task][source][side][class]."""
    counts: dict = {}
    for i, (r, side) in enumerate(zip(rows, sides)):
        for task, lab in labels.items():
            k = ys[task][i]
            if k >= 0:
                c = counts.setdefault(task, {}).setdefault(r["source"], {}).setdefault(side, Counter())
                c[lab.classes[k]] += 1
    return {t: {s: {side: dict(c) for side, c in v.items()} for s, v in per.items()} for t, per in counts.items()}


def _unreadable(rows, facts, decode_all: bool) -> list[tuple[str, str]]:
    """Files that cannot be opened (and, with `decode_all`, decoded): one line per file, the decoder's reason."""
    unreadable = [(f["path"], f["error"]) for f in facts if "error" in f]
    if not decode_all:
        return unreadable

    def try_decode(p):
        try:
            decode(p)
        except ImageError as e:
            return p, e.reason
        return None
    with ThreadPoolExecutor(4) as pool:
        decoded = dict(x for x in pool.map(try_decode, [r["path"] for r in rows]) if x)
    return sorted((dict(unreadable) | decoded).items())


def _label(labels, ys, i) -> str:
    return LabelSet.joined(lab.classes[ys[t][i]] for t, lab in labels.items() if ys[t][i] >= 0)


def _size_summary(sizes: np.ndarray) -> dict:
    if not len(sizes):
        return {}
    w, h = sizes[:, 0], sizes[:, 1]
    longest = sizes.max(1)
    edges = [0, 32, 64, 128, 256, 512, 1024, 4096, 10**9]
    hist = {f"{a}-{b - 1}" if b < 10**9 else f">={a}": int(((longest >= a) & (longest < b)).sum())
            for a, b in zip(edges, edges[1:])}
    return {"width": {"min": int(w.min()), "median": float(np.median(w)), "max": int(w.max())},
            "height": {"min": int(h.min()), "median": float(np.median(h)), "max": int(h.max())},
            "longest_side_histogram": {k: v for k, v in hist.items() if v}}


def format_report(r: dict) -> str:
    lines = [f"{r['recipe']}: {r['images']} images ({r['dropped_without_label']} dropped without a label)", ""]
    for task, per in r["counts"].items():
        lines.append(f"[{task}] images per class, per source and side (train / val)")
        classes = sorted({c for s in per.values() for side in s.values() for c in side})
        for source, sides in per.items():
            lines.append(f"  {source}: " + ", ".join(
                f"{c} {sides.get('train', {}).get(c, 0)}/{sides.get('val', {}).get(c, 0)}" for c in classes))
    leak = r["leakage"]
    groups, same = leak["groups_on_both_sides"], leak["identical_files_on_both_sides"]
    verdict = ("LEAK: " + "; ".join(groups)) if groups else \
        (f"LEAK: no group id is on both sides, but {len(same)} byte-identical file pair(s) are (give duplicates the "
         "same group id)") if same else "clean: no group and no identical file on both sides"
    lines += ["", f"leakage audit: {verdict}", f"byte-identical files on both sides: {len(same)}"]
    lines += [f"  {a}  ==  {b}" for a, b in leak["identical_files_on_both_sides"][:10]]
    lines += ["", f"unreadable images: {len(r['unreadable'])}"] + [f"  {p}: {why}" for p, why in r["unreadable"][:20]]
    kinds = Counter(o.split(" (")[0] for f in r["odd_files"] for o in f["odd"])
    lines += ["", f"odd files: {len(r['odd_files'])} (" + ", ".join(f"{k}: {n}" for k, n in kinds.most_common()) + ")"]
    names_only = {"non-ASCII name", "space in name"}
    serious = sorted(r["odd_files"], key=lambda f: all(o in names_only for o in f["odd"]))  # content problems first
    lines += [f"  {f['path']}: {', '.join(f['odd'])}" for f in serious[:30]]
    if r.get("faces"):
        from framework.data.faces import describe

        lines += [""] + describe(r["faces"]) + ([f"  contact sheet: {r['faces']['sheet']}"] if "sheet" in r["faces"]
                                               else [])
    s = r["sizes"]
    if s:
        lines += ["", f"width {s['width']['min']}..{s['width']['max']} (median {s['width']['median']:.0f}), height "
                      f"{s['height']['min']}..{s['height']['max']} (median {s['height']['median']:.0f})",
                  "longest side: " + ", ".join(f"{k}: {v}" for k, v in s["longest_side_histogram"].items())]
    return "\n".join(lines)


def augmentation_preview(recipe, rows: list[dict], names: list[str], draws: int = 5) -> np.ndarray:
    """A grid: per sample, the original, the resized image, then `draws` draws of the training pipeline."""
    from PIL import ImageDraw

    from framework import transforms as T
    from framework.data.dataset import resize_one
    from framework.backbones import resolve_inputs

    size, _, _ = resolve_inputs(recipe)
    augs = T.build_augmentations(recipe.transforms, size)
    boxes = T.needs_face_box(augs)
    resize = T.resize_stage(size, recipe.transforms.resize, with_boxes=boxes or any(r.get("box") for r in rows))
    augment = T.augmentation_stage(augs, with_boxes=boxes)
    tile = max(96, min(160, max(size)))
    cols = 2 + draws
    sheet = Image.new("RGB", (cols * (tile + 4), len(rows) * (tile + 18) + 18), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(["original", f"resized {size[1]}x{size[0]}"] + [f"train draw {k + 1}" for k in range(draws)]):
        draw.text((c * (tile + 4) + 2, 2), title, fill="black")
    for r, (row, name) in enumerate(zip(rows, names)):
        original = decode(row["path"])
        resized, box = resize_one(row["path"], row.get("box") if boxes or row.get("box") else None, resize)
        images = [original, resized]
        for k in range(draws):
            augment.set_random_seed(1000 + 17 * r + k)
            extra = {"bboxes": np.array([box] if box else np.zeros((0, 4)), dtype=np.float32),
                     "box_ids": [0] if box else []} if boxes else {}
            images.append(augment(image=resized, **extra)["image"] if augs else resized)
        y = 18 + r * (tile + 18)
        for c, img in enumerate(images):
            im = Image.fromarray(img)
            scale = tile / max(im.size)  # small images are enlarged (pixel-exact), large ones reduced
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                           Image.NEAREST if scale > 1 else Image.LANCZOS)
            sheet.paste(im, (c * (tile + 4), y))
        draw.text((2, y + tile + 2), f"{name}  {Path(row['path']).name[:40]}", fill="black")
    return np.asarray(sheet)
