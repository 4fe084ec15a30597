"""Grad-CAM (the grad-cam package) for trained runs: where does the model look?

Works for CNNs (the last spatial feature map is the target layer) and ViTs (the last block's first norm; its
token grid is reshaped to an image, prefix tokens dropped), per task for multi-task runs. Heatmaps are drawn at
the size of the original image.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from framework.errors import Issue, RunError


class _TaskOutput(nn.Module):
    """The model restricted to one task's logits (Grad-CAM expects a tensor out)."""

    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x):
        return self.model(x)[self.task]


def _require_gradcam():
    import importlib.util

    if importlib.util.find_spec("pytorch_grad_cam") is None:
        raise RunError(Issue("Grad-CAM needs the grad-cam package.", fix='pip install "recipe-framework[review]" '
                             "(or pip install grad-cam)."))


def target_layer(model: nn.Module, size: tuple[int, int], name: str | None = None):
    """(layer, reshape_transform): the named module, or the last spatial feature map (CNN) / last block (ViT)."""
    features = model.net.features
    modules = dict(model.named_modules())
    if name:
        if name not in modules:
            from framework.errors import did_you_mean
            raise RunError(Issue(f"no layer {name!r} in this model.{did_you_mean(name, list(modules))}",
                                 field="--layer", fix="name a module from model.named_modules()."))
        layer = modules[name]
    elif hasattr(features, "blocks") and len(getattr(features, "blocks")):
        block = features.blocks[-1]
        layer = getattr(block, "norm1", block)
    else:
        outputs = []
        def record(mod, _inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() == 4 and min(output.shape[2:]) > 1:
                outputs.append(mod)

        hooks = [m.register_forward_hook(record) for m in features.modules() if m is not features]
        with torch.no_grad():
            model(torch.zeros(1, 3, *size, dtype=torch.uint8))
        for h in hooks:
            h.remove()
        if not outputs:
            raise RunError(Issue("found no spatial feature map to explain.", field="--layer",
                                 fix="name the layer with --layer."))
        layer = outputs[-1]
    return layer, _reshape_for(features, layer, size)


def _reshape_for(features, layer, size):
    """ViT blocks give (N, tokens, C): drop the prefix tokens and fold the rest into (N, C, h, w)."""
    if not hasattr(features, "blocks"):
        return None
    prefix = getattr(features, "num_prefix_tokens", 1)

    def reshape(t):
        if t.dim() != 3:
            return t
        grid = t[:, prefix:, :]
        n = grid.shape[1]
        h = int(round(math.sqrt(n * size[0] / size[1])))
        w = n // max(h, 1)
        return grid.reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)
    return reshape


def cams(run, paths: list[str], task: str | None = None, target: str | None = None, layer_name: str | None = None,
         boxes: list | None = None):
    """For each image and task: (path, task, predicted class, probability, heatmap of the original size, image).
    A run that crops to faces (`transforms.resize.face_margin`) sees, and is shown on, the face region: from
    `boxes` (one per path, or None), else from the face detector; without a face, the whole image."""
    _require_gradcam()
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from framework.data.dataset import decode

    tasks = [task] if task else list(run.labels)
    unknown = [t for t in tasks if t not in run.labels]
    if unknown:
        raise RunError(Issue(f"the run has no task {unknown[0]!r} (tasks: {', '.join(run.labels)}).", field="--task",
                             fix="name one of its tasks."))
    h, w = _input_size(run)
    layer, reshape = target_layer(run.model, (h, w), layer_name)
    extra = {"bboxes": np.zeros((0, 4), np.float32), "box_ids": []} if getattr(run.resize, "processors", None) else {}
    views = []  # per image, once for all tasks: what the model starts from (decoded, face-cropped) and its input
    for i, p in enumerate(paths):
        original = face_view(run, decode(p), boxes[i] if boxes else None)
        x = torch.from_numpy(np.ascontiguousarray(run.resize(image=original, **extra)["image"]))
        views.append((original, x.permute(2, 0, 1)[None].float()))  # (1, 3, H, W), 0..255: the model normalizes
    out = []
    for t in tasks:
        classes = run.labels[t].classes
        if target is not None and target not in classes:
            raise RunError(Issue(f"{target!r} is not a class of task {t!r} ({', '.join(classes)}).",
                                 field="--target", fix="name one of its classes."))
        wrapped = _TaskOutput(run.model, t).eval()
        with GradCAM(model=wrapped, target_layers=[layer], reshape_transform=reshape) as cam:
            for p, (original, x) in zip(paths, views):
                with torch.no_grad():
                    prob = wrapped(x).softmax(1)[0]
                k = classes.index(target) if target is not None else int(prob.argmax())
                heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(k)])[0]  # (H, W) in 0..1
                heat = _unresize(heat, original.shape[:2], run.recipe.transforms.resize.mode)
                out.append({"path": p, "task": t, "class": classes[k], "prob": float(prob[k]), "heat": heat,
                            "image": original})
    return out


def face_view(run, image: np.ndarray, box=None) -> np.ndarray:
    """What a face-cropping run's resize stage starts from: the face region (the image itself otherwise)."""
    margin = run.recipe.transforms.resize.face_margin
    if margin is None:
        return image
    from framework.transforms import face_region

    if box is None:
        from framework.inference.predict import run_detector
        box = run_detector(run)(image)
    region = face_region(box, image.shape[1], image.shape[0], margin) if box else None
    return image[region[1]:region[3], region[0]:region[2]] if region else image


def _input_size(run) -> tuple[int, int]:
    from framework.backbones import resolve_inputs

    size, _, _ = resolve_inputs(run.recipe)
    return size


def _unresize(heat: np.ndarray, shape: tuple[int, int], mode: str) -> np.ndarray:
    """Map a heatmap on the model's input back onto the original image (undo pad / crop / stretch)."""
    H, W = heat.shape
    h, w = shape
    if mode == "pad":  # the image was fitted inside, then padded: cut the padding away
        s = min(H / h, W / w)
        ih, iw = round(h * s), round(w * s)
        top, left = (H - ih) // 2, (W - iw) // 2
        heat = heat[top:top + ih, left:left + iw]
    elif mode == "crop":  # the image was scaled to cover, then centre-cropped: the border gets no heat
        s = max(H / h, W / w)
        full = np.zeros((round(h * s), round(w * s)), dtype=heat.dtype)
        top, left = (full.shape[0] - H) // 2, (full.shape[1] - W) // 2
        full[top:top + H, left:left + W] = heat
        heat = full
    return np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)) / 255.0


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image with a blue -> red heatmap blended over it (RGB uint8, same size)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32) / 255.0, heat.astype(np.float32), use_rgb=True,
                             image_weight=1 - alpha)


def contact_sheet(items: list[dict], tile: int = 160, cols: int = 4) -> np.ndarray:
    cols = min(cols, len(items))
    rows = (len(items) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (tile + 4), rows * (tile + 30)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, it in enumerate(items):
        r, c = divmod(k, cols)
        im = Image.fromarray(it["overlay"])
        scale = tile / max(im.size)  # small faces are enlarged too, so every tile is readable
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
        sheet.paste(im, (c * (tile + 4), r * (tile + 30)))
        true = it.get("true")
        caption = f"{it['task']}: {it['class']} {it['prob']:.2f}" + (f" (true {true})" if true else "")
        draw.text((c * (tile + 4) + 2, r * (tile + 30) + tile + 2), caption,
                  fill="black" if true in (None, it["class"]) else "red")
        draw.text((c * (tile + 4) + 2, r * (tile + 30) + tile + 15), Path(it["path"]).name[:24], fill="gray")
    return np.asarray(sheet)


def explain(run_path, images: list[str], out: str | Path, task=None, target=None, layer=None) -> dict:
    """Write one overlay PNG per image and task, and contact_sheet.png."""
    from framework.inference import run as R

    run = R.load_run(run_path)
    paths, boxes = [], []
    for item in images:
        p = Path(item)
        if p.suffix.lower() == ".csv":  # a CSV: its `path` column, and face boxes when the run crops to faces
            listed = R.list_images(csv_file=p).paths
            paths += listed
            boxes += R.face_boxes(run, p) or [None] * len(listed)
            continue
        listed = R.list_images(images=p).paths if p.is_dir() else [str(p)]
        paths += listed
        boxes += [None] * len(listed)
    if not paths:
        raise RunError(Issue("no images to explain.", field="IMAGES", fix="give image files, folders or CSVs."))
    if run.recipe.transforms.resize.face_margin is not None and not all(boxes):
        known = R.data_boxes(run)
        boxes = [b or known.get(str(Path(p).resolve())) for p, b in zip(paths, boxes)]
    items = cams(run, paths, task, target, layer, boxes)
    truth = true_labels(run, [Path(i) for i in images if Path(i).suffix.lower() == ".csv"])
    for it in items:
        it["true"] = truth.get(str(Path(it["path"]).resolve()), {}).get(it["task"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for it in items:
        it["overlay"] = overlay(it["image"], it["heat"])
        name = out / f"{Path(it['path']).stem}_{it['task']}_{it['class'].replace('/', '-')}.png"
        Image.fromarray(it["overlay"]).save(name)
        written.append(name)
    Image.fromarray(contact_sheet(items)).save(out / "contact_sheet.png")
    return {"out": out, "files": written, "items": items}


def true_labels(run, csv_files: list[Path]) -> dict[str, dict[str, str]]:
    """Known true classes by resolved image path: the run's own split (split.csv), and CSVs given to explain that
    carry the run's label columns (read with the run's task definitions: maps, bins)."""
    import csv

    from framework.data.labels import label_value
    from framework.inference.run import split_rows

    out: dict[str, dict[str, str]] = {}
    for side in ("train", "val"):
        for r in split_rows(run, side):
            out[str(Path(r["path"]).resolve())] = {t: r[t] for t in run.labels if r.get(t)}
    specs = {t: s for t, s in run.recipe.task_specs().items() if not s.composite}
    for f in csv_files:
        with open(f, newline="", encoding="utf-8-sig") as fh:
            for r in csv.DictReader(fh):
                known = {}
                for t, spec in specs.items():
                    try:
                        value = label_value(r, spec, (), lenient=True)
                    except Exception:  # a value the run's task cannot read (not a number for bins ...)
                        value = None
                    if value in run.labels[t].classes:
                        known[t] = value
                path = Path(r.get("path", ""))
                out[str((path if path.is_absolute() else f.parent / path).resolve())] = known
    return out


class CamHook:
    """`logging.cam_every: N`: every N validations, the Grad-CAMs of a fixed set of misclassified validation images
    go to TensorBoard. Passed to the engine by the API (the engine never imports review code). It works on a copy
    of the evaluated model in eval mode, with every RNG stream saved and restored, so the run trains exactly as it
    would without it; the images it follows are kept in the run folder (cam_images.json), so a resumed run follows
    the same ones."""

    def __init__(self, recipe, every: int, images: int):
        self.recipe, self.every, self.images = recipe, every, images
        self.chosen: dict | None = None  # {"paths": [...], "boxes": [...]}

    def after_validation(self, ctx) -> None:
        if ctx.validations % self.every or ctx.log.writer is None:
            return
        chosen = self._chosen(ctx)
        if not chosen["paths"]:
            return
        items = _isolated_cams(ctx.built, self.recipe, chosen["paths"], chosen["boxes"])
        for it in items:
            it["overlay"] = overlay(it["image"], it["heat"])
        ctx.log.image("val/gradcam", contact_sheet(items), ctx.epoch)

    def _chosen(self, ctx) -> dict:
        """The misclassified validation images of the first time (wrong on some task they have a label for)."""
        from framework.folders import RunFolder

        folder = RunFolder(ctx.log.run_dir)
        if self.chosen is None:
            self.chosen = folder.cam_images()  # (checked: validation images of this run only)
        if self.chosen is None:
            y, p = ctx.v_stats["y_true"], ctx.v_stats["y_pred"]
            wrong = np.nonzero(((y != p) & (y >= 0)).any(1))[0][: self.images]
            rows = ctx.built.val_loader.dataset.rows
            self.chosen = {"paths": [rows[i]["path"] for i in wrong], "boxes": [rows[i].get("box") for i in wrong]}
            folder.write_cam_images(self.chosen)
        return self.chosen


def _isolated_cams(built, recipe, paths: list[str], boxes: list) -> list[dict]:
    """Grad-CAMs computed on a copy of the evaluated model, with the RNG streams restored afterwards."""
    import copy
    import random
    from types import SimpleNamespace

    from framework.data.labels import LabelSet

    model = copy.deepcopy(built.accelerator.unwrap_model(built.eval_model)).eval()
    run = SimpleNamespace(model=model, resize=built.loaders.resize, recipe=recipe,
                          labels={t: LabelSet(h.classes) for t, h in built.heads.items()})
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            return cams(run, paths, boxes=boxes)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
