"""Recipe transform specs -> albumentations pipelines.

The pipeline has two parts. The *resize stage* is deterministic, runs first and once per image (its output is
cached, see framework.data.dataset). The *augmentations* run after it, every epoch, on training images only.
Evaluation images get the resize stage alone; normalization happens inside the model (framework.models), so
predictions can never use different statistics than training did.
"""
from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

from framework.errors import FieldError, did_you_mean
from framework.libs import albumentations

# Transforms that resize: after the resize stage they repeat work (and change the size the model expects).
_RESIZERS = {"Resize", "LongestMaxSize", "SmallestMaxSize", "RandomScale", "Downscale"}
_VERTICAL = {"VerticalFlip", "Transpose"}
_COMPOSITIONS = {"OneOf", "SomeOf", "Sequential"}
_NEEDS_CODE = {"Lambda"}  # takes callables: nothing a YAML value can be
# Crops whose output size must be the image size (subclasses, such as plugins' crops, included).
_SIZE_BOUND = {"RandomResizedCrop", "RandomSizedCrop", "CenterCrop", "RandomCrop", "RandomSizedBBoxSafeCrop",
               "CropAndPad", "RandomCropNearBBox", "AtLeastOneBBoxRandomCrop", "BBoxSafeRandomCrop"}
_INTERP = {"nearest": 0, "linear": 1, "cubic": 2, "area": 3}


def transform_names() -> list[str]:
    A = albumentations()
    return sorted(n for n, c in vars(A).items()
                  if isinstance(c, type) and issubclass(c, A.BasicTransform) and not n.startswith("_")
                  and not inspect.isabstract(c) and n not in {"BasicTransform", "DualTransform", "ImageOnlyTransform"})


def build_transform(spec: dict, where: tuple, size: tuple[int, int] | None = None):
    """One albumentations transform from `{name: X, **args}`, with its own argument schema checked strictly.
    A crop that leaves out its output size (`size`, or `height` and `width`) gets the image size `size` (h, w)."""
    A = albumentations()
    args = {k: v for k, v in spec.items() if k != "name"}
    name = spec["name"]
    if name in _COMPOSITIONS:
        return _build_composition(A, name, args, where, size)
    from framework.registry import TRANSFORMS

    if name in _NEEDS_CODE:
        raise FieldError(where + ("name",), f"{name} runs Python functions, which a recipe cannot hold (its "
                         "arguments would be strings, and the run would fail on its first image).",
                         "write the function as a transform in a plugin file (see plugins/face_crop.py) and name "
                         "that transform here.")
    cls = TRANSFORMS.get(name).load() if name in TRANSFORMS else getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        choices = transform_names() + TRANSFORMS.names()
        raise FieldError(where + ("name",), f"unknown transform {name!r}.{did_you_mean(name, choices)}",
                         "use an albumentations transform name (case matters), e.g. HorizontalFlip, or one "
                         "registered by a plugin (`recipe plugins`).")
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    unknown = [k for k in args if k not in params]
    if unknown:
        raise FieldError.many([(where + (k,), f"{name} has no argument {k!r}.{did_you_mean(k, params)}",
                                f"arguments of {name}: {', '.join(params)}.") for k in unknown])
    if size is not None and _SIZE_BOUND & {c.__name__ for c in cls.__mro__}:
        args = _with_size(args, params, size)
    try:
        return cls(**args, strict=True) if "strict" in params else cls(**args)
    except Exception as e:  # albumentations wraps its pydantic InitSchema errors in ValueError
        cause = e.__cause__ if hasattr(e.__cause__, "errors") else (e if hasattr(e, "errors") else None)
        if cause is not None:
            items = []
            for err in cause.errors(include_url=False):
                arg = err["loc"][0] if err["loc"] else None
                path = where + ((arg,) if arg in args else ())
                items.append((path, f"{name}: {err['msg']} (got {err.get('input')!r}).",
                              f"see the {name} arguments in the albumentations documentation."))
            raise FieldError.many(items) from None
        raise FieldError(where, f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())}) failed: {e}.",
                         f"check the arguments of {name}.") from None


def _with_size(args: dict, params: list[str], size: tuple[int, int]) -> dict:
    """The image size as a crop's output size, where the recipe left it out."""
    if "size" in params and "size" not in args:
        return {**args, "size": [int(size[0]), int(size[1])]}
    if "height" in params and "width" in params and "height" not in args and "width" not in args:
        return {**args, "height": int(size[0]), "width": int(size[1])}
    return args


def _build_composition(A, name: str, args: dict, where: tuple, size: tuple[int, int] | None = None):
    """OneOf / SomeOf / Sequential with `transforms: [specs]`, built recursively."""
    children = args.pop("transforms", None)
    if not isinstance(children, list) or not children:
        raise FieldError(where + ("transforms",), f"{name} needs a non-empty list `transforms: [...]`.",
                         f"write {{name: {name}, transforms: [{{name: GaussianBlur}}, {{name: GaussNoise}}]}}.")
    built, problems = [], []
    for j, child in enumerate(children):
        if not isinstance(child, dict) or not isinstance(child.get("name"), str):
            problems.append((where + ("transforms", j), "each item needs `name: <transform>`.",
                             "write {name: GaussianBlur}."))
            continue
        try:
            built.append(build_transform(child, where + ("transforms", j), size))
        except FieldError as e:
            problems += e.items
    if problems:
        raise FieldError.many(problems)
    params = [p for p in inspect.signature(getattr(A, name).__init__).parameters if p not in ("self", "transforms")]
    unknown = [k for k in args if k not in params]
    if unknown:
        raise FieldError(where + (unknown[0],), f"{name} has no argument {unknown[0]!r}."
                         f"{did_you_mean(unknown[0], params)}", f"arguments of {name}: transforms, {', '.join(params)}.")
    try:
        return getattr(A, name)(built, **args)
    except Exception as e:
        raise FieldError(where, f"{name} failed: {e}.", f"check the arguments of {name}.") from None


def load_saved_pipeline(path: str):
    """A pipeline written by albumentations' `A.save` (YAML or JSON), as a list of transforms."""
    import yaml

    from framework.io import FileProblem, read_text

    A = albumentations()
    p = Path(path)
    where = ("transforms", "train_file")
    try:
        text = read_text(p, 4 << 20)
    except FileProblem as e:
        raise FieldError(where, f"the pipeline file {p} {e.reason}.", "give the path of an A.save file "
                         "(a YAML or JSON text file).") from None
    try:
        data = yaml.safe_load(text)  # (JSON is YAML too)
        if not isinstance(data, dict):
            raise ValueError(f"it holds a {type(data).__name__}, not a saved pipeline")
        names = _names_in(data.get("transform"))
        if names & _NEEDS_CODE:
            raise ValueError(f"it uses {sorted(names & _NEEDS_CODE)}, which run Python functions a file cannot hold")
        loaded = A.from_dict(data)
    except Exception as e:
        raise FieldError(("transforms", "train_file"), f"albumentations could not load {p}: {e}.",
                         "write it with A.save(pipeline, path) from albumentations 2.0.") from None
    items = list(loaded.transforms) if isinstance(loaded, A.Compose) else [loaded]
    for t in items:
        if type(t).__name__ == "Normalize":
            raise _normalize_error(("transforms", "train_file"), t.mean, t.std)
    return [t for t in items if type(t).__name__ not in _MODEL_DOES]


def _names_in(node) -> set[str]:
    """The transform class names in a saved pipeline's tree (compositions included)."""
    if not isinstance(node, dict):
        return set()
    name = str(node.get("__class_fullname__", "")).rsplit(".", 1)[-1]
    children = node.get("transforms") if isinstance(node.get("transforms"), list) else []
    return {name}.union(*(_names_in(c) for c in children))


# what the model does itself: a pipeline's tensor conversion is left out (with a warning); Normalize is an error
_MODEL_DOES = {"ToTensorV2"}


def _normalize_error(where: tuple, mean, std) -> FieldError:
    return FieldError(where, "Normalize would normalise the images a second time: the model normalises its own "
                      "inputs (the backbone's mean/std, or transforms.normalize) in training and in every prediction.",
                      f"remove it; if mean {list(mean)} and std {list(std)} are not the backbone's, set "
                      "transforms.normalize: {mean: [...], std: [...]} (0..1 pixel values).")


def dropped(tcfg) -> list[tuple[tuple, str, str]]:
    """Warnings for pipeline items left out because the model does their work (ToTensorV2)."""
    return [(("transforms", "train", i), f"{spec.get('name')} is left out: images become tensors in the loader.",
             "remove it from the list.") for i, spec in enumerate(tcfg.train) if spec.get("name") in _MODEL_DOES]


def build_augmentations(tcfg, size: tuple[int, int] | None = None) -> list:
    """The training augmentations of a transforms section; every problem of every item is reported. `size`
    (h, w) is the image size: the output size of crops that leave theirs out."""
    if tcfg.train_file:
        return load_saved_pipeline(tcfg.train_file)
    out, problems = [], []
    for i, spec in enumerate(tcfg.train):
        if spec.get("name") in _MODEL_DOES:
            continue
        if spec.get("name") == "Normalize":
            problems += _normalize_error(("transforms", "train", i), spec.get("mean", (0.485, 0.456, 0.406)),
                                         spec.get("std", (0.229, 0.224, 0.225))).items
            continue
        try:
            out.append(build_transform(spec, ("transforms", "train", i), size))
        except FieldError as e:
            problems += e.items
    if problems:
        raise FieldError.many(problems)
    return out


def lint(transforms: list, image_size=None) -> list[tuple[tuple, str, str]]:
    """Warnings (not errors): augmentations that are wrong for faces or repeat the resize stage's work."""
    warnings = []
    for i, top in enumerate(transforms):
        for t in _flatten(top):
            name, where = type(t).__name__, ("transforms", "train", i)
            if name in _VERTICAL:
                warnings.append((where, f"{name} turns faces upside down; real faces are never seen that way.",
                                 "use HorizontalFlip instead."))
            if name in _RESIZERS:
                warnings.append((where, f"{name} resizes again after the resize stage (work done twice, and the size "
                                        f"the model sees changes).", "drop it; set transforms.image_size instead."))
    return warnings


def size_errors(transforms: list, image_size: tuple[int, int]) -> list[tuple[tuple, str, str]]:
    """Crops whose output is not the image size: the batch would mix sizes (a torch `stack` error in the first
    step) or the model would train at another size than it is validated at."""
    errors = []
    for i, top in enumerate(transforms):
        for t in _flatten(top):
            if not _SIZE_BOUND & {c.__name__ for c in type(t).__mro__}:
                continue
            size = getattr(t, "size", None) or (getattr(t, "height", None), getattr(t, "width", None))
            if None not in size and tuple(size) != tuple(image_size):
                errors.append((("transforms", "train", i), f"{type(t).__name__} outputs {tuple(size)}, but the "
                               f"image size is {tuple(image_size)}.",
                               f"leave its size out (it then follows transforms.image_size), or set it to "
                               f"{list(image_size)}."))
    return errors


def _flatten(t) -> list:
    """A transform and, for OneOf / SomeOf / Sequential, everything inside it."""
    children = getattr(t, "transforms", None)
    return [t] + [c for child in (children or []) for c in _flatten(child)]


def face_region(box, width: int, height: int, margin: float) -> tuple[int, int, int, int] | None:
    """The square around a face box (x0, y0, x1, y1 in pixels): side = the box's longer side grown by `margin` of
    it on each side, centred on the box, then clipped to the image. None when the box is empty."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    half = max(x1 - x0, y1 - y0) * (0.5 + margin)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    region = (max(0, round(cx - half)), max(0, round(cy - half)), min(width, round(cx + half)),
              min(height, round(cy + half)))
    return region if region[2] > region[0] and region[3] > region[1] else None


_CROP_TO_FACE = None


def crop_to_face(margin: float):
    """A deterministic crop to the first face box grown by `margin` (see face_region); no box: the whole image."""
    global _CROP_TO_FACE
    if _CROP_TO_FACE is None:
        A = albumentations()

        class CropToFace(A.crops.transforms.BaseCrop):
            def __init__(self, margin: float = 0.25, p: float = 1.0):
                super().__init__(p=p)
                self.margin = margin

            def get_params_dependent_on_data(self, params, data):
                h, w = params["shape"][:2]
                bboxes = data.get("bboxes")
                region = None
                if bboxes is not None and len(bboxes):  # albumentations keeps boxes normalized to 0..1
                    b = bboxes[0]
                    region = face_region((b[0] * w, b[1] * h, b[2] * w, b[3] * h), w, h, self.margin)
                return {"crop_coords": region or (0, 0, w, h)}

            def get_transform_init_args_names(self):
                return ("margin",)

        _CROP_TO_FACE = CropToFace
    return _CROP_TO_FACE(margin=margin)


def resize_stage(size: tuple[int, int], resize, with_boxes: bool = False):
    """The deterministic front: fit every image to `size` (h, w); boxes, when present, follow the image. With
    `resize.face_margin`, each image is first cropped to its face (boxes are then always carried)."""
    A = albumentations()
    h, w = size
    interp = _INTERP[resize.interpolation]
    with_boxes = with_boxes or resize.face_margin is not None
    if resize.mode == "stretch":
        steps = [A.Resize(h, w, interpolation=interp, p=1.0)]
    elif resize.mode == "pad":
        steps = [A.LongestMaxSize(max_size_hw=(h, w), interpolation=interp, p=1.0),
                 A.PadIfNeeded(h, w, border_mode=0, fill=0, p=1.0)]
    else:
        steps = [A.SmallestMaxSize(max_size_hw=(h, w), interpolation=interp, p=1.0), A.CenterCrop(h, w, p=1.0)]
    if resize.face_margin is not None:
        steps.insert(0, crop_to_face(resize.face_margin))
    bbox = A.BboxParams(format="pascal_voc", label_fields=["box_ids"], clip=True, min_area=0, min_visibility=0) \
        if with_boxes else None
    return A.Compose(steps, bbox_params=bbox, strict=True)


def needs_face_box(transforms: list) -> bool:
    """Whether any augmentation (e.g. a face-keeping crop) asks for the face box."""
    return any(getattr(t, "needs_face_box", False) for top in transforms for t in _flatten(top))


def augmentation_stage(transforms: list, with_boxes: bool = False):
    A = albumentations()
    bbox = A.BboxParams(format="pascal_voc", label_fields=["box_ids"], clip=True, min_area=0, min_visibility=0) \
        if with_boxes else None
    return A.Compose(transforms, bbox_params=bbox, strict=True)


def image_size_of(tcfg, default_hw: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """(h, w) from `transforms.image_size`; `auto` needs the backbone's default (given by the caller)."""
    s = tcfg.image_size
    if s == "auto":
        return default_hw
    return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))
