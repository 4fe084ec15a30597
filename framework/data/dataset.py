"""Decode -> cached deterministic resize -> random augmentation -> uint8 tensor.

Decoding handles what real folders contain: EXIF rotation, palette and alpha images (composited on white),
grayscale, 16-bit and CMYK files, extensions that lie. The resize stage runs once per image and is kept in
memory (`data.cache: memory`); only the augmentations run every epoch, seeded per (seed, epoch, index) so a
run is reproducible whatever the number of loader workers, and resumes exactly.
"""
from __future__ import annotations

import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 120_000_000  # refuse decompression bombs (Pillow's own limit is about 89M and only warns)


class ImageError(Exception):
    """An image that cannot be used, with the reason."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


def decode(path: str) -> np.ndarray:
    """The image as an RGB uint8 array (H, W, 3), upright, transparency flattened onto white."""
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
        import os
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


def resize_one(path: str, box, resize, detect: bool = False) -> tuple[np.ndarray, tuple | None]:
    """Decode one image and run the resize stage; the face box (if any) follows the image. With `detect`, an
    image without a box gets one from the face detector, run on the full decoded image (before the resize)."""
    image = decode(path)
    if detect and box is None:
        from framework.data.faces import detect_face
        box = detect_face(image)
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


def prepare(rows: list[dict], resize, threads: int = 4, progress: bool = False, desc: str = "decode+resize",
            detect: bool = False):
    """Decode and resize every row once (and, with `detect`, find a face box where the data has none).
    Returns (images, boxes, failures) where failures is [(index, reason)]."""
    images: list = [None] * len(rows)
    boxes: list = [None] * len(rows)
    failures: list[tuple[int, str]] = []

    def work(i):
        try:
            images[i], boxes[i] = resize_one(rows[i]["path"], rows[i].get("box"), resize, detect)
        except ImageError as e:
            failures.append((i, e.reason))

    it = range(len(rows))
    if progress and sys.stderr.isatty():
        from tqdm.auto import tqdm
        it = tqdm(it, desc=desc, unit="img", leave=False)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(work, it))
    return images, boxes, sorted(failures)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch (independent of workers and batch order)."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2**32)


class ImageDataset:
    """Samples for the loader: (uint8 tensor C x H x W, label). Cached images, or decode on every access."""

    def __init__(self, rows, labels, resize, augment=None, images=None, boxes=None, seed: int = 0):
        self.rows, self.labels = rows, list(labels)
        self.resize, self.augment = resize, augment
        self.images, self.boxes = images, boxes
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
        labels = torch.tensor(label if isinstance(label, tuple) else (label,), dtype=torch.long)  # (T,)
        return tensor, labels, i
