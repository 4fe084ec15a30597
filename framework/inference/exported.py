"""An exported model folder (framework.inference.export) opened for `recipe predict EXPORT_DIR`: the ONNX file runs
with onnxruntime and torch is never imported; a TorchScript export needs torch. Everything after the model's
outputs (questions of a composite, the decision rule, the prediction CSV, class shares) is the code that predicts
from a run folder, so both write the same columns and the same answers."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from framework.errors import Issue, RunError
from framework.folders import ExportFolder, damaged
from framework.inference.run import LoadedRun

AGAIN = "export the run again: recipe export RUN --out DIR (do not edit the folder)."


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
    crop, box columns) comes from export.json, so neither the recipe's registries nor torch are loaded. Everything
    export.json says is checked against the model file before any image is predicted."""
    from pydantic import ValidationError

    from framework import transforms as T
    from framework.data.labels import LabelSet
    from framework.recipe.schema.training import ResizeSpec

    export = ExportFolder(folder)
    raw, info = export.info()
    try:
        resize = ResizeSpec.model_validate(info.resize)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        raise damaged(export.file(export.INFO), f"the resize stage is not one: {err['msg']}.",
                      field="resize." + ".".join(map(str, err["loc"])), fix=AGAIN) from None
    model_file = export.model_file(info)
    labels = {t: LabelSet(list(e.classes), e.parts) for t, e in info.labels.items()}
    size, tta = tuple(info.input.size), info.tta
    sources = [SimpleNamespace(box_columns=c) for c in info.box_columns]
    recipe = SimpleNamespace(transforms=SimpleNamespace(resize=resize), data=SimpleNamespace(sources=sources),
                             eval=SimpleNamespace(tta=None if tta == "none" else tta))  # what predict reads
    model = load_model(model_file, info.format)
    _check_model(model, export, list(info.outputs), size, labels)
    return ExportedRun(export.path, recipe, labels, model, T.resize_stage(size, resize), model_file,
                       class_counts=info.train_counts, composite_counts=info.composite_counts,
                       outputs=list(info.outputs), baked_tta=tta)


def _check_model(model, export: ExportFolder, outputs: list, size: tuple, labels: dict) -> None:
    """export.json and the model file agree (names of the outputs, input size), every task has its output, and
    each output's width is its classes' count (one blank image through the model), with finite values."""
    problems = []
    if getattr(model, "names", outputs) != outputs:
        problems.append(f"the model's outputs {model.names} are not those export.json lists ({outputs})")
    shape = getattr(model, "input_shape", None)
    if shape is not None and [d for d in shape[2:]] != list(size):
        problems.append(f"the model takes images of {shape[2:]}, export.json says {list(size)}")
    missing = [t for t in labels if f"{t}.probs" not in outputs]
    if missing:
        problems.append(f"no `.probs` output for task(s) {missing}")
    if not problems:
        problems = _output_problems(model, outputs, size, labels)
    if problems:
        raise RunError(Issue(f"{export.path}: " + "; ".join(problems) + ".", field="EXPORT_DIR",
                             file=str(export.file(export.INFO)), fix=AGAIN))


def _output_problems(model, outputs: list, size: tuple, labels: dict) -> list[str]:
    widths = {f"{t}.probs": len(lab.classes) for t, lab in labels.items()}  # (logits: a kind's own width)
    widths |= {f"{q}.probs": len(c) for lab in labels.values() for q, c in (lab.parts or {}).items()}
    try:
        got = dict(zip(outputs, model(np.zeros((1, 3, *size), dtype=np.uint8))))
    except Exception as e:  # noqa: BLE001 - the file runs, but not on what export.json says it takes
        return [f"the model does not run on a {size[0]}x{size[1]} image ({str(e).splitlines()[0][:200]})"]
    problems = [f"output {name} has {got[name].shape[-1]} values per image, but its task has {n} classes"
                for name, n in widths.items() if name in got and got[name].shape[-1:] != (n,)]
    if not all(np.isfinite(v).all() for v in got.values()):
        problems.append("the model gives NaN or infinite outputs")
    return problems
