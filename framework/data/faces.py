"""Face boxes where the data has none: face detectors by name (`DETECTORS`), run once per image on the decoded image
(the box is cached with the resized image, keyed by the file's bytes and the detector with its settings).

Boxes from the data always come first; detection is the fallback. Built-ins:
- `haar`: OpenCV's bundled Haar cascade (no extra package). Trained on bare faces: masks defeat it (61 of 160 masked
  faces of the kaggle scene photos at IoU >= 0.3, docs/benchmarks.md).
- `mtcnn`: MTCNN with the weights inside facenet-pytorch 2.5.3 (MIT; `pip install -e ".[faces]"`): 150 of 160.
`transforms.face_detector: auto` (the default) is mtcnn where facenet-pytorch is installed, else haar; `validate`
writes the concrete name into the resolved recipe. A plugin adds one with `@DETECTORS.register("name", args=Model)`
on a subclass of `Detector`.
"""
from __future__ import annotations

import importlib.util
import threading

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from framework.registry import DETECTORS

Box = tuple[float, float, float, float]


class Detector:
    """Finds faces in an RGB uint8 image. Subclasses implement `faces` (boxes with a score, any order); calling the
    detector gives the one face a crop keeps: the largest."""

    name = "?"

    def __init__(self, args: BaseModel):
        self.args = args
        self._local = threading.local()  # detectors that are not thread-safe keep one model per loader thread

    @property
    def identity(self) -> str:
        """What the cache keys detected boxes by: the name, the settings and the package version."""
        return f"{self.name}:{self.args.model_dump_json()}:{self.version()}"

    def version(self) -> str:
        return ""

    def faces(self, image: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        raise NotImplementedError

    def __call__(self, image: np.ndarray) -> Box | None:
        found = self.faces(image)
        if not found:
            return None
        x0, y0, x1, y1, _ = max(found, key=lambda f: (f[2] - f[0]) * (f[3] - f[1]))
        return float(x0), float(y0), float(x1), float(y1)


class HaarArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale_factor: float = Field(1.1, gt=1, le=2, description="Image pyramid step.")
    min_neighbors: int = Field(4, ge=0, le=50, description="Overlapping detections a face needs.")
    min_size: float = Field(0.125, gt=0, le=1, description="Smallest face, as a share of the image's shorter side.")


@DETECTORS.register("haar", args=HaarArgs, help="OpenCV's Haar cascade (bundled; weak on masked faces)")
class Haar(Detector):
    name = "haar"

    def version(self) -> str:
        import cv2

        return cv2.__version__

    def _cascade(self):
        if not hasattr(self._local, "cascade"):  # cv2.CascadeClassifier is not thread-safe: one per thread
            import cv2

            self._local.cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        return self._local.cascade

    def faces(self, image: np.ndarray):
        import cv2

        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        side = max(8, int(min(gray.shape[:2]) * self.args.min_size))
        found = self._cascade().detectMultiScale(gray, scaleFactor=self.args.scale_factor,
                                                 minNeighbors=self.args.min_neighbors, minSize=(side, side))
        return [(float(x), float(y), float(x + w), float(y + h), 1.0) for x, y, w, h in found]


class MtcnnArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_confidence: float = Field(0.7, ge=0, le=1, description="Faces MTCNN is less sure of are dropped (its own "
                                                              "last stage keeps 0.7 and above; 0.9 loses masked "
                                                              "faces: 146 of 160 instead of 150).")
    min_face_size: int = Field(20, ge=8, le=1024, description="Smallest face searched for, in pixels.")


@DETECTORS.register("mtcnn", args=MtcnnArgs, package="facenet_pytorch", extra="faces",
                    help="MTCNN, weights inside facenet-pytorch (pip install -e \".[faces]\")")
class Mtcnn(Detector):
    name = "mtcnn"

    def version(self) -> str:
        from importlib.metadata import version

        return version("facenet-pytorch")

    def _model(self):
        if not hasattr(self._local, "model"):
            from facenet_pytorch import MTCNN

            self._local.model = MTCNN(keep_all=True, min_face_size=self.args.min_face_size, device="cpu")
        return self._local.model

    def faces(self, image: np.ndarray):
        import torch

        with torch.inference_mode():
            boxes, probs = self._model().detect(np.ascontiguousarray(image))
        if boxes is None:
            return []
        return [(*map(float, b), float(p)) for b, p in zip(boxes, probs) if p >= self.args.min_confidence]


def installed(name: str) -> bool:
    """Whether the package a detector needs is installed."""
    package = DETECTORS.get(name).meta.get("package")
    return package is None or importlib.util.find_spec(package) is not None


def concrete(name: str) -> str:
    """`auto` -> mtcnn where facenet-pytorch is installed, else haar; other names as they are."""
    if name != "auto":
        return name
    return "mtcnn" if installed("mtcnn") else "haar"


def detector(spec) -> Detector:
    """The detector a recipe's `transforms.face_detector` names, with its args checked (validate checked them)."""
    entry = DETECTORS.get(concrete(spec.name))
    args = entry.meta.get("args")
    return entry.load()(args.model_validate(spec.args) if args is not None else BaseModel())


def missing_package(name: str) -> tuple[str, str] | None:
    """(message, fix) when the detector `name` needs a package that is not installed, else None."""
    if installed(concrete(name)):
        return None
    meta = DETECTORS.get(concrete(name)).meta
    extra = f'pip install -e ".[{meta["extra"]}]" (or pip install {meta["package"].replace("_", "-")})' \
        if meta.get("extra") else f"pip install {meta['package']}"
    return (f"face detector {name!r} needs the package {meta['package']!r}, which is not installed.",
            f"{extra}, or name another detector (haar needs nothing extra).")


_cached: dict = {}


def for_recipe(recipe) -> Detector:
    """The detector of a recipe (one instance per detector and settings, so its models load once)."""
    spec = recipe.transforms.face_detector
    key = (concrete(spec.name), repr(sorted(spec.args.items())))
    if key not in _cached:
        _cached[key] = detector(spec)
    return _cached[key]


ORIGINS = ("data", "detector", "none")


def box_counts(rows: list[dict], boxes: list, sides: list[str], classes: list[str], detector=None) -> dict:
    """Where each image's face box came from - the data, the detector, or none (used whole) - in all, per side,
    and per source and class (a detector that misses masked faces more than bare ones biases the training set)."""
    zero = dict.fromkeys(ORIGINS, 0)
    out = {"detector": detector.name if detector is not None else None, "all": dict(zero), "by": {}}
    for row, box, side, cls in zip(rows, boxes, sides, classes):
        origin = "none" if box is None else ("data" if row.get("box") else "detector")
        out["all"][origin] += 1
        out.setdefault(side, dict(zero))[origin] += 1
        out["by"].setdefault(f"{row.get('source', '?')}/{cls}", dict(zero))[origin] += 1
    return out


def describe(counts: dict) -> list[str]:
    """The counts as lines for a run's output and `recipe inspect`."""
    a = counts["all"]
    by = f" ({counts['detector']})" if counts.get("detector") else ""
    lines = [f"face boxes: {a['data']} from the data, {a['detector']} from the detector{by}, {a['none']} without a "
             "face (used whole)"]
    searched = {k: v for k, v in counts["by"].items() if v["detector"] + v["none"]}
    if searched:
        lines.append("  detector found, by source/class: " + ", ".join(
            f"{k} {v['detector']}/{v['detector'] + v['none']} ({v['detector'] / (v['detector'] + v['none']):.0%})"
            for k, v in sorted(searched.items())))
    return lines
