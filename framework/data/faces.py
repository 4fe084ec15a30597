"""Face boxes when the data has none: OpenCV's bundled Haar cascade, run once per image on the resized image.

Masks defeat the cascade often (it was trained on bare faces), so boxes from the data always come first and
detection is only the fallback; images where it finds nothing are counted and follow the transform's `no_face`.
"""
from __future__ import annotations

import threading

import numpy as np

_local = threading.local()


def _cascade():
    if not hasattr(_local, "cascade"):  # cv2.CascadeClassifier is not thread-safe: one per thread
        import cv2

        _local.cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    return _local.cascade


def detect_face(image: np.ndarray) -> tuple[float, float, float, float] | None:
    """The largest frontal face (x0, y0, x1, y1) in an RGB uint8 image, or None."""
    import cv2

    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    side = min(gray.shape[:2])
    faces = _cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=4, minSize=(max(8, side // 8),) * 2)
    if len(faces) == 0:
        return None
    x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
    return float(x), float(y), float(x + w), float(y + h)
