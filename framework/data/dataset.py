"""Decode -> cached deterministic resize -> random augmentation -> uint8 tensor.

Decoding handles what real folders contain: EXIF rotation, palette and alpha images (composited on white),
grayscale, 16-bit and CMYK files, extensions that lie. The resize stage runs once per image and is kept in
memory (`data.cache: memory`); only the augmentations run every epoch, seeded per (seed, epoch, index) so a
run is reproducible whatever the number of loader workers, and resumes exactly.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps
from pathlib import Path

MAX_PIXELS = 120_000_000  # refuse decompression bombs (Pillow's own limit is about 89M and only warns)
MAX_IMAGE_BYTES = 1 << 30  # the largest file taken for an image (16-bit TIFFs of MAX_PIXELS fit)


class ImageError(Exception):
    """An image that cannot be used, with the reason."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


def regular_file(path: str) -> None:
    """Only regular files are read: a device (/dev/zero), a FIFO or a folder named as an image is refused before it
    is opened (reading /dev/zero never ends)."""
    import stat

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except OSError as e:
        raise ImageError(path, f"cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(path, "not a regular file (a device, pipe or folder)")
    if st.st_size > MAX_IMAGE_BYTES:  # (checked before the disk cache hashes the file)
        raise ImageError(path, f"{st.st_size:,} bytes is over the {MAX_IMAGE_BYTES:,} an image file can be")


def decode(path: str) -> np.ndarray:
    """The image as an RGB uint8 array (H, W, 3), upright, transparency flattened onto white."""
    regular_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ImageError(path, f"{im.width}x{im.height} pixels is over the {MAX_PIXELS:,} limit")
                im = ImageOps.exif_transpose(im)
                return np.asarray(_to_rgb(im))
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(path, f"too large ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        reason = "empty file" if _size(path) == 0 else f"not a readable image ({e})"
        raise ImageError(path, reason) from None


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        hi = a.max() or 1.0
        im = Image.fromarray((a * (255.0 / (65535.0 if hi > 255 else 255.0))).clip(0, 255).astype(np.uint8))
    if im.mode == "F":
        im = Image.fromarray(np.asarray(im).clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB") if im.mode != "RGB" else im


def resize_one(path: str, box, resize, detector=None) -> tuple[np.ndarray, tuple | None]:
    """Decode one image and run the resize stage; the face box (if any) follows the image. With a `detector`
    (framework.data.faces), an image without a box gets one, found on the full decoded image (before the resize)."""
    image = decode(path)
    if detector is not None and box is None:
        box = detector(image)
    carries_boxes = bool(getattr(resize, "processors", None))
    if box is None or not carries_boxes:
        extra = {"bboxes": np.zeros((0, 4), dtype=np.float32), "box_ids": []} if carries_boxes else {}
        return resize(image=image, **extra)["image"], None
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box
    clipped = (max(0.0, min(x0, w)), max(0.0, min(y0, h)), max(0.0, min(x1, w)), max(0.0, min(y1, h)))
    if clipped[2] - clipped[0] < 1 or clipped[3] - clipped[1] < 1:
        return resize(image=image, bboxes=np.zeros((0, 4)), box_ids=[])["image"], None
    out = resize(image=image, bboxes=np.array([clipped], dtype=np.float32), box_ids=[0])
    boxes = out["bboxes"]
    return out["image"], (tuple(float(v) for v in boxes[0]) if len(boxes) else None)


class DiskCache:
    """Resized images on disk, reused across epochs and runs.

    An entry's key is a hash of the file's bytes, its face box and the resize settings, so a changed file or
    setting is a new key and never a stale hit. Entries are written to a temporary name and renamed, so several
    loader workers or processes can fill the cache at once. `trim` removes the least recently used entries above
    the size limit."""

    def __init__(self, folder: str | Path, settings: str, max_bytes: int):
        self.folder, self.settings, self.max_bytes = Path(folder).expanduser(), settings, max_bytes
        self.hits = self.misses = 0

    def key(self, path: str, box, detector=None) -> str:
        regular_file(path)
        h = hashlib.blake2b(digest_size=20)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(f"|{self.settings}|{box}|{detector.identity if detector is not None and box is None else None}"
                 .encode())
        return h.hexdigest()

    def entry(self, key: str) -> Path:
        """The image (a plain .npy, fast to read); its face box, if any, sits beside it in `<key>.box.npy`."""
        return self.folder / key[:2] / f"{key}.npy"

    def box(self, key: str):
        """The cached face box of an entry (False when there is no usable entry: none, or one whose content does not
        match the checksum written with it - damaged, truncated or replaced - which is then decoded again)."""
        p = self.entry(key)
        try:
            if p.with_suffix(".sum").read_text() != _digest(p.read_bytes()):
                return False
            os.utime(p)  # most recently used
            b = p.with_suffix(".box.npy")
            return tuple(float(v) for v in np.load(b)) if b.exists() else None
        except (OSError, ValueError):
            return False

    def load(self, key: str) -> np.ndarray:
        return np.load(self.entry(key))

    def store(self, key: str, image: np.ndarray, box) -> None:
        p = self.entry(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tag = f"{os.getpid()}.{threading.get_ident()}"
        if box:  # the box first: an image without its box must never be visible
            tmp = p.with_name(f".{key}.{tag}.box.npy")
            np.save(tmp, np.array(box, dtype=np.float32))
            os.replace(tmp, p.with_suffix(".box.npy"))
        tmp = p.with_name(f".{key}.{tag}.npy")
        np.save(tmp, np.ascontiguousarray(image))
        digest = _digest(tmp.read_bytes())
        os.replace(tmp, p)
        tmp = p.with_name(f".{key}.{tag}.sum")  # the checksum last: an entry is used only once it matches
        tmp.write_text(digest)
        os.replace(tmp, p.with_suffix(".sum"))

    def trim(self) -> int:
        """Remove least recently used entries until the cache is under its size limit; how many were removed."""
        entries = [(e.stat().st_mtime, e.stat().st_size, e) for e in self.folder.glob("*/*.npy")
                   if not e.name.endswith(".box.npy")]
        total = sum(size for _, size, _ in entries)
        removed = 0
        for _, size, e in sorted(entries):
            if total <= self.max_bytes:
                break
            e.unlink(missing_ok=True)
            e.with_suffix(".box.npy").unlink(missing_ok=True)
            e.with_suffix(".sum").unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class CachedImages:
    """The images of a dataset, read from the disk cache on access (what a loader worker does per sample)."""

    def __init__(self, cache: DiskCache, keys: list[str]):
        self.cache, self.keys = cache, keys

    def __getitem__(self, i: int) -> np.ndarray:
        return self.cache.load(self.keys[i])

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, idx: list[int]) -> "CachedImages":
        return CachedImages(self.cache, [self.keys[i] for i in idx])


def prepare(rows: list[dict], resize, threads: int = 4, progress: str | None = None, detector=None,
            cache: DiskCache | None = None):
    """Decode and resize every row once (and, with a `detector`, find a face box where the data has none: its box
    is cached with the image, keyed by the detector and its settings), keeping the
    result in memory, or in `cache` on disk (hits are not decoded at all). `progress`: the description of a
    progress bar, shown in a terminal only (None: no bar).
    Returns (images, boxes, failures) where failures is [(index, reason)]."""
    images: list = [None] * len(rows)
    boxes: list = [None] * len(rows)
    keys: list = [None] * len(rows)
    failures: list[tuple[int, str]] = []
    lock = threading.Lock()

    def work(i):
        try:
            if cache is None:
                images[i], boxes[i] = resize_one(rows[i]["path"], rows[i].get("box"), resize, detector)
                return
            keys[i] = cache.key(rows[i]["path"], rows[i].get("box"), detector)
            hit = cache.box(keys[i])
            if hit is not False:
                boxes[i] = hit
                with lock:
                    cache.hits += 1
                return
            image, boxes[i] = resize_one(rows[i]["path"], rows[i].get("box"), resize, detector)
            cache.store(keys[i], image, boxes[i])
            with lock:
                cache.misses += 1
        except FileNotFoundError:
            failures.append((i, "file not found"))
        except ImageError as e:
            failures.append((i, e.reason))

    it = range(len(rows))
    if progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        from framework.io import bar_size
        it = tqdm(it, desc=progress, unit="img", leave=False, **bar_size())
    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(work, it))
    if cache is not None:
        cache.trim()
        return CachedImages(cache, keys), boxes, sorted(failures)
    return images, boxes, sorted(failures)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch (independent of workers and batch order)."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2**32)


class ImageDataset:
    """Samples for the loader: (uint8 tensor C x H x W, label). Cached images, or decode on every access."""

    def __init__(self, rows, labels, resize, augment=None, cached: tuple | None = None, seed: int = 0):
        """`cached`: (images, boxes) from `prepare`, else each image is decoded and resized on every access."""
        self.rows, self.labels = rows, list(labels)
        self.resize, self.augment = resize, augment
        self.images, self.boxes = cached if cached is not None else (None, None)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, i: int) -> tuple[np.ndarray, tuple | None]:
        if self.images is not None:
            return self.images[i], self.boxes[i]
        return resize_one(self.rows[i]["path"], self.rows[i].get("box"), self.resize)

    def __getitem__(self, key: int | tuple[int, int]):
        """`index`, or `(epoch, index)` from the training sampler: augmentation is seeded per epoch and sample."""
        import torch

        epoch, i = key if isinstance(key, tuple) else (0, key)
        image, box = self.load(i)
        if self.augment is not None:
            self.augment.set_random_seed(sample_seed(self.seed, epoch, i))
            extra = {"bboxes": np.array([box] if box else np.zeros((0, 4)), dtype=np.float32),
                     "box_ids": [0] if box else []} if getattr(self.augment, "processors", None) else {}
            image = self.augment(image=image, **extra)["image"]
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # (3, H, W) uint8
        label = self.labels[i]
        labels = torch.tensor(label if isinstance(label, tuple) else (label,), dtype=torch.float32)  # (T,)
        return tensor, labels, i
