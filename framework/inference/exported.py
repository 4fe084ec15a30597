"""An exported model folder (framework.inference.export) opened for `recipe predict EXPORT_DIR`: the ONNX file runs
with onnxruntime and torch is never imported; a TorchScript export needs torch. Everything after the model's
outputs (questions of a composite, the decision rule, the prediction CSV, class shares) is the code that predicts
from a run folder, so both write the same columns and the same answers."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from framework.errors import Issue, RunError
from framework.inference.run import EXPORT_FILE as FILE, LoadedRun


def onnx_session(path: Path):
    """A callable: uint8 (N, 3, H, W) batch -> list of outputs, run by onnxruntime on the CPU."""
    try:
        import onnxruntime
    except ImportError:
        raise RunError(Issue("onnxruntime is not installed: an ONNX export runs with it.", field="EXPORT_DIR",
                             fix='pip install -e ".[export]"  (or: pip install onnxruntime)')) from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # a damaged or foreign file: onnxruntime's message says what it could not read
        raise RunError(Issue(f"{path} cannot be loaded by onnxruntime: {str(e).splitlines()[0][:300]}",
                             field="EXPORT_DIR", fix="export the run again: recipe export RUN --out DIR.")) from None
    run = lambda batch: session.run(None, {"images": batch})  # noqa: E731
    run.names = [o.name for o in session.get_outputs()]
    run.input_shape = list(session.get_inputs()[0].shape)
    return run


def load_model(path: Path, fmt: str):
    """A callable: uint8 (N, 3, H, W) numpy batch -> list of numpy outputs in export order (TorchScript: torch
    after all)."""
    if fmt == "onnx":
        return onnx_session(path)
    import warnings

    import torch

    with warnings.catch_warnings():  # torch 2.14 marks TorchScript deprecated; it still loads
        warnings.simplefilter("ignore", FutureWarning)
        try:
            module = torch.jit.load(str(path)).eval()
        except Exception as e:  # a damaged or foreign file
            raise RunError(Issue(f"{path} cannot be loaded as TorchScript: {str(e).splitlines()[0][:300]}",
                                 field="EXPORT_DIR", fix="export the run again: recipe export RUN --out DIR.")) from None

    def run_torchscript(batch):
        with torch.no_grad():
            return [o.numpy() for o in module(torch.from_numpy(batch))]
    return run_torchscript


@dataclass
class ExportedRun(LoadedRun):
    """A LoadedRun whose model is the exported file: `forward` reads its outputs by name."""

    outputs: list | None = None
    baked_tta: str = "none"

    def forward(self, batch: np.ndarray, tta: str | None) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        if (tta or "none") != self.baked_tta:
            raise RunError(Issue(f"this model was exported with test-time augmentation {self.baked_tta!r} inside; "
                                 f"--tta {tta or 'none'} cannot change it.", field="--tta",
                                 fix=f"leave --tta out, or export again with `recipe export RUN --tta {tta or 'none'}`."))
        named = dict(zip(self.outputs, self.model(batch)))
        return {t: (named[f"{t}.probs"], named.get(f"{t}.value")) for t in self.labels}


def load_export(folder: str | Path) -> ExportedRun:
    """The exported folder as a run predict can use: what the model needs in front of it (the resize stage, face
    crop, box columns) comes from export.json, so neither the recipe's registries nor torch are loaded."""
    from framework import transforms as T
    from framework.data.labels import LabelSet
    from framework.recipe.schema.training import ResizeSpec

    folder = Path(folder)
    try:
        info = json.loads((folder / FILE).read_text(encoding="utf-8"))
        model_file = folder / info["file"]
        labels = {t: LabelSet.from_json(v) for t, v in info["labels"].items()}
        size, fmt, outputs, tta = tuple(info["input"]["size"]), info["format"], list(info["outputs"]), info["tta"]
        resize = ResizeSpec.model_validate(info["resize"])
        sources = [SimpleNamespace(box_columns=c) for c in info["box_columns"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(Issue(f"{folder / FILE} is not a readable export description ({e}).", field="EXPORT_DIR",
                             fix="export the run again: recipe export RUN --out DIR.")) from None
    if not model_file.is_file():
        raise RunError(Issue(f"{model_file} is missing.", field="EXPORT_DIR", fix="export the run again."))
    recipe = SimpleNamespace(transforms=SimpleNamespace(resize=resize), data=SimpleNamespace(sources=sources),
                             eval=SimpleNamespace(tta=None if tta == "none" else tta))  # what predict reads
    model = load_model(model_file, fmt)
    _check_model(model, folder, outputs, size, labels)
    return ExportedRun(folder, recipe, labels, model, T.resize_stage(size, resize), model_file,
                       class_counts=info.get("train_counts"), composite_counts=info.get("composite_counts"),
                       outputs=outputs, baked_tta=tta)


def _check_model(model, folder: Path, outputs: list, size: tuple, labels: dict) -> None:
    """export.json and the model file agree (names of the outputs, input size), and every task has its output."""
    problems = []
    if getattr(model, "names", outputs) != outputs:
        problems.append(f"the model's outputs {model.names} are not those export.json lists ({outputs})")
    shape = getattr(model, "input_shape", None)
    if shape is not None and [d for d in shape[2:]] != list(size):
        problems.append(f"the model takes images of {shape[2:]}, export.json says {list(size)}")
    missing = [t for t in labels if f"{t}.probs" not in outputs]
    if missing:
        problems.append(f"no `.probs` output for task(s) {missing}")
    if problems:
        raise RunError(Issue(f"{folder}: " + "; ".join(problems) + ".", field="EXPORT_DIR",
                             fix="export the run again: recipe export RUN --out DIR (do not edit the folder)."))
