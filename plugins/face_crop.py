"""Example plugin: a random crop that always keeps the whole face.

Like RandomResizedCrop (a random area fraction `scale` and aspect ratio `ratio`, then a resize to `size`), but the
crop always contains the face box. The box comes from the data (a manifest's box columns, carried through the resize
stage) or, when the data has none, from OpenCV's Haar face detector, run once per image in the cached resize stage.
Images without a face follow `no_face`: `center` (a centred crop of a random size) or `none` (the whole image).

Use it in a recipe:
    plugins: [../plugins/face_crop.py]          # relative to the recipe file
    transforms:
      train:
        - {name: FaceKeepingCrop, scale: [0.5, 1.0]}
"""
from __future__ import annotations

import math
from typing import Literal

import albumentations as A
import cv2

from framework.registry import TRANSFORMS


def face_box_pixels(bboxes, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The first box (albumentations' normalized x0, y0, x1, y1) in whole pixels, grown outward and clipped."""
    if bboxes is None or len(bboxes) == 0:
        return None
    x0, y0, x1, y1 = (float(v) for v in bboxes[0][:4])
    box = (max(0, math.floor(x0 * width)), max(0, math.floor(y0 * height)),
           min(width, math.ceil(x1 * width)), min(height, math.ceil(y1 * height)))
    return box if box[2] > box[0] and box[3] > box[1] else None


def crop_around(box, width: int, height: int, scale, ratio, rng, no_face: str = "center"):
    """Crop coordinates (x0, y0, x1, y1): random area and aspect like RandomResizedCrop, always containing `box`."""
    if box is None and no_face == "none":
        return 0, 0, width, height
    area = width * height
    bw, bh = (box[2] - box[0], box[3] - box[1]) if box else (1, 1)
    cw = ch = None
    for _ in range(10):
        target = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * r)), round(math.sqrt(target / r))
        if bw <= cw <= width and bh <= ch <= height:
            break
    cw, ch = min(width, max(bw, cw, 1)), min(height, max(bh, ch, 1))
    if box is None:  # no face: a centred crop of the drawn size
        x0, y0 = (width - cw) // 2, (height - ch) // 2
    else:  # any position that keeps the box inside: x0 <= box.x0 and x0 + cw >= box.x1 (same for y)
        x0 = rng.randint(max(0, box[2] - cw), min(box[0], width - cw))
        y0 = rng.randint(max(0, box[3] - ch), min(box[1], height - ch))
    return x0, y0, x0 + cw, y0 + ch


@TRANSFORMS.register()
class FaceKeepingCrop(A.RandomResizedCrop):
    """RandomResizedCrop that never cuts the face: the crop always contains the whole face box."""

    needs_face_box = True  # tells the framework to carry face boxes (or detect them once) for this pipeline

    class InitSchema(A.RandomResizedCrop.InitSchema):
        no_face: Literal["center", "none"]

    def __init__(self, size: tuple[int, int], scale: tuple[float, float] = (0.5, 1.0),
                 ratio: tuple[float, float] = (0.75, 4 / 3), no_face: Literal["center", "none"] = "center",
                 interpolation: int = cv2.INTER_LINEAR, mask_interpolation: int = cv2.INTER_NEAREST,
                 area_for_downscale: Literal[None, "image", "image_mask"] = None, p: float = 1.0):
        super().__init__(size=size, scale=scale, ratio=ratio, interpolation=interpolation,
                         mask_interpolation=mask_interpolation, area_for_downscale=area_for_downscale, p=p)
        self.no_face = no_face

    def get_params_dependent_on_data(self, params, data):
        height, width = params["shape"][:2]
        box = face_box_pixels(data.get("bboxes"), width, height)
        return {"crop_coords": crop_around(box, width, height, self.scale, self.ratio, self.py_random, self.no_face)}

    def get_transform_init_args_names(self):
        return (*super().get_transform_init_args_names(), "no_face")
