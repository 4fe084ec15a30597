"""Data sources -> one samples table: a list of rows `{path, source, group, box, <columns>}`.

Readers only list files and read manifests; they never decode images (that is framework.data.dataset's job),
so building the table is fast enough for `recipe validate` to do it.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from framework.errors import DataError, FieldError, did_you_mean
from framework.recipe.schema.data import BundledSource, CsvSource, FolderSource, MaskContestSource
from framework.registry import READERS, RegistryError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
MASK_CONTEST_FILES = {**{f"mask{i}": "wear" for i in range(1, 6)}, "incorrect_mask": "incorrect", "normal": "not_wear"}
MAX_MANIFEST_BYTES = 512 << 20  # about 5 million rows
_PERSON = re.compile(r"^(?P<id>[^_]+)_(?P<gender>[^_]+)_(?P<race>[^_]+)_(?P<age>\d+)$")


def read_sources(data_cfg) -> list[dict]:
    """Every source of a data section, concatenated, in a deterministic order."""
    root = Path(data_cfg.root)
    if not root.is_dir():
        raise FieldError(("data", "root"), f"data root {str(root)!r} is not a folder.",
                         "point data.root at your data, e.g. --set data.root=/path/to/data.", DataError)
    rows: list[dict] = []
    for i, src in enumerate(data_cfg.sources):
        where = ("data", "sources", i)
        try:
            entry = READERS.get(src.type)
        except RegistryError as e:
            raise FieldError(where + ("type",), str(e), "use folder, csv, mask_contest, bundled, or load the "
                             "plugin that provides this reader (`plugins:`).", DataError) from None
        if _args_model(entry) is not None:
            src = _own_args(entry, src, where)
        got = entry.load()(src, root, where)
        if not got:
            raise FieldError(("data", "sources", i), f"source {src.name!r} has no images.",
                             "check its path and that the files have image extensions "
                             f"({', '.join(sorted(IMAGE_EXTENSIONS))}).", DataError)
        for r in got:
            r["source"] = src.name
        rows += got
    _same_file_twice(rows)
    return rows


def _same_file_twice(rows: list[dict]) -> None:
    """One file listed twice - under two paths (a hard link, a second source over the same folder) - is one image
    with two rows: it could sit on both sides of the split under two group ids, so it is refused."""
    seen: dict[tuple[int, int], dict] = {}
    for r in rows:
        try:
            st = os.stat(r["path"])
        except OSError:
            continue  # a missing file is reported with the images
        first = seen.setdefault((st.st_dev, st.st_ino), r)
        if first is not r:
            raise FieldError(("data", "sources"), f"the same file is listed twice: {first['path']} (source "
                             f"{first['source']!r}) and {r['path']} (source {r['source']!r}) are one file (a hard "
                             "link, a link or two sources over the same folder).",
                             "list each image once (remove one of the rows, or the second source).", DataError)


def _args_model(entry):
    """The pydantic model of a source's keys its reader registered (`args=`; `schema=` is its older name)."""
    return entry.meta.get("args") or entry.meta.get("schema")


def _own_args(entry, src, where: tuple):
    """Check a source's keys with the args model its reader registered: every error, located."""
    from pydantic import ValidationError

    model = _args_model(entry)
    if isinstance(src, model):
        return src  # a built-in source: the recipe's schema parsed it with this very model
    try:
        return model.model_validate(src.model_dump())
    except ValidationError as e:
        items = [(where + tuple(x for x in err["loc"] if isinstance(x, (str, int))), err["msg"],
                  f"see the {entry.name} reader ({entry.origin}).") for err in e.errors(include_url=False)]
        raise FieldError.many(items, DataError) from None


def _resolve(root: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else root / p


class _RealPaths:
    """`Path.resolve()` of many files in few folders: each folder is resolved once, then only a file that is itself
    a link is resolved again (the same result as resolving each path, without an lstat per path component)."""

    def __init__(self):
        self.folders: dict[str, str] = {}

    def __call__(self, path: Path) -> Path:
        folder, name = os.path.split(str(path))
        if name in ("", ".", ".."):
            return path.resolve()
        real = self.folders.get(folder)
        if real is None:
            real = self.folders[folder] = os.path.realpath(folder or ".")
        joined = os.path.join(real, name)
        return Path(os.path.realpath(joined) if os.path.islink(joined) else joined)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


@READERS.register("folder", args=FolderSource)
def read_folder(src, root: Path, where: tuple) -> list[dict]:
    base = _resolve(root, src.path)
    if not base.is_dir():
        raise FieldError(where + ("path",), f"folder not found: {base}.",
                         "give a folder with one sub-folder per class, relative to data.root.", DataError)
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise FieldError(where + ("path",), f"{base} has no class sub-folders.",
                         "put each class's images in its own sub-folder.", DataError)
    rows = []
    for c in classes:
        files = sorted(p for p in (base / c).rglob("*") if _is_image(p))
        if not files:
            raise FieldError(where + ("path",), f"class folder {base / c} is empty (no images).",
                             "add images or remove the empty folder.", DataError)
        rows += [{"path": str(p), "group": str(p), src.column: c} for p in files]
    return rows


@READERS.register("csv", args=CsvSource)
def read_csv(src, root: Path, where: tuple) -> list[dict]:
    manifest = _resolve(root, src.manifest)
    if not manifest.is_file():
        raise FieldError(where + ("manifest",), f"manifest not found: {manifest}.",
                         "give the CSV's path relative to data.root (or absolute).", DataError)
    image_root = _resolve(root, src.root) if src.root else manifest.parent
    header, table = read_table(manifest, where + ("manifest",))
    needed = [("path_column", src.path_column)] + ([("group_column", src.group_column)] if src.group_column else [])
    needed += [("box_columns", c) for c in (src.box_columns or [])]
    needed += [("filter", c) for c in (src.filter or {})]
    missing = [(where + (field,), f"column {col!r} is not in {manifest.name}.{did_you_mean(col, header)}",
                f"columns there: {', '.join(header)}.") for field, col in needed if col not in header]
    if missing:
        raise FieldError.many(missing, DataError)
    rows, seen, real_path, real_root = [], {}, _RealPaths(), image_root.resolve()
    for line, rec in enumerate(table, start=2):
        if src.filter and any(rec[c] not in {str(v) for v in allowed} for c, allowed in src.filter.items()):
            continue
        rel = rec[src.path_column]
        if not rel:
            raise FieldError(where + ("manifest",), f"{manifest.name} line {line}: empty {src.path_column!r}.",
                             "fill in or remove the row.", DataError)
        path = real_path(_resolve(image_root, rel))
        if not path.is_relative_to(real_root) and not src.allow_outside_root:
            raise FieldError(where + ("manifest",), f"{manifest.name} line {line}: path {rel!r} points outside "
                             f"the image root {image_root}.", "keep image paths inside the data folder, or set "
                             "allow_outside_root: true on this source if you trust the manifest.", DataError)
        if str(path) in seen:
            raise FieldError(where + ("manifest",), f"{manifest.name} line {line}: path {rel!r} is listed twice "
                             f"(first on line {seen[str(path)]}).", "remove the duplicate row.", DataError)
        seen[str(path)] = line
        row = dict(rec)
        row["path"] = str(path)
        row["group"] = f"{src.name}:{path}"
        if src.group_column and rec[src.group_column]:
            row["group"] = rec[src.group_column]
        row["box"] = row_box(rec, src.box_columns)
        row["_line"] = f"{manifest}:{line}"
        rows.append(row)
    return rows


def read_table(path: Path, where: tuple) -> tuple[list[str], list[dict]]:
    """A CSV file as (header, rows). A file that is not UTF-8 text (a Latin-1 export) or holds NUL bytes (binary
    data) is an error naming its line and the fix."""
    import io

    from framework.io import FileProblem, read_bytes

    try:
        raw = read_bytes(path, MAX_MANIFEST_BYTES)
    except FileProblem as e:
        raise FieldError(where, f"the CSV {path} {e.reason}.", "give a CSV text file.", DataError) from None
    if b"\x00" in raw:
        line = raw[:raw.index(b"\x00")].count(b"\n") + 1
        raise FieldError(where, f"{path.name} line {line} holds a NUL byte: binary data, not CSV text.",
                         "export the manifest again as plain CSV text.", DataError)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise FieldError(where, f"{path.name} line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x}); it was "
                         "probably saved as Latin-1 / Windows-1252.",
                         f"re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > utf8.csv.", DataError) from None
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return list(reader.fieldnames or []), list(reader)
    except csv.Error as e:
        raise FieldError(where, f"{path.name} is not a readable CSV: {e}.", "check its quoting.", DataError) from None


def row_box(rec: dict, cols) -> tuple[float, float, float, float] | None:
    if not cols:
        return None
    try:
        box = tuple(float(rec[c]) for c in cols)
    except (TypeError, ValueError):
        return None  # no box on this row (e.g. an image without annotation)
    return box if box[2] > box[0] and box[3] > box[1] else None


@READERS.register("mask_contest", args=MaskContestSource)
def read_mask_contest(src, root: Path, where: tuple) -> list[dict]:
    base = _resolve(root, src.path)
    if not base.is_dir():
        raise FieldError(where + ("path",), f"folder not found: {base}.",
                         "give the folder that holds the ID_gender_race_age person folders.", DataError)
    rows = []
    for person in sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")):
        m = _PERSON.match(person.name)
        if not m:
            raise FieldError(where + ("path",), f"person folder {person.name!r} is not named ID_gender_race_age.",
                             "rename it (e.g. 000001_female_Asian_45) or move it out of the data folder.", DataError)
        for f in sorted(p for p in person.iterdir() if _is_image(p)):
            state = MASK_CONTEST_FILES.get(f.stem.lower())
            if state is None:
                raise FieldError(where + ("path",), f"unexpected file {f}: expected mask1..mask5, incorrect_mask "
                                 "or normal.", "rename or remove the file.", DataError)
            rows.append({"path": str(f), "group": person.name, "person": person.name, "mask_state": state,
                         "gender": m["gender"].lower(), "race": m["race"], "age": m["age"], "box": None})
    return rows


@READERS.register("bundled", args=BundledSource)
def read_bundled(src, root: Path, where: tuple) -> list[dict]:
    """scikit-image's LFW subset or scikit-learn's digits, written once as PNG files (real images, shipped)."""
    cache = Path(src.cache_dir).expanduser() if src.cache_dir else Path.home() / ".cache" / "recipe" / src.dataset
    done = cache / ".complete"
    if not done.exists():
        _write_bundled(src.dataset, cache)
        done.write_text("ok\n")
    return read_folder(type("S", (), {"path": str(cache), "column": "label"})(), root, where)


def _write_bundled(dataset: str, out: Path) -> None:
    import numpy as np
    from PIL import Image

    if dataset == "lfw_subset":
        from skimage import data as skdata

        images = skdata.lfw_subset()  # (200, 25, 25) floats in 0..1: 100 faces, then 100 non-faces
        labels = ["face"] * 100 + ["non_face"] * 100
        images = (images * 255).round().astype(np.uint8)
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        images = (d.images * (255 / 16)).round().astype(np.uint8)
        labels = [str(t) for t in d.target]
    for i, (img, lab) in enumerate(zip(images, labels)):
        (out / lab).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(out / lab / f"{i:04d}.png")

