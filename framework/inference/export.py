"""`recipe export`: a trained run as one model file that needs neither this framework's model code nor torch.

The folder holds `model.onnx` (or TorchScript `model.pt`), `export.json` (input size and layout, outputs, classes
per task, the composite's formula, test-time augmentation, source run and recipe hash, the check below), the run's
`labels.json`, `recipe.resolved.yaml` (its resize stage: what `recipe predict EXPORT_DIR` feeds the model), its
decision rule when it has one, and `MODEL_CARD.md`.

The model takes uint8 images (N, 3, H, W) as the framework's model does, normalises inside, and has a dynamic batch
axis. Its outputs are, per task, `<task>.logits`, `<task>.probs` (what predictions choose from, after the task
kind's own rule: softmax, ordinal bands, an anomaly threshold) and, for a regression task, `<task>.value`. A
composite head's questions are derived from its probabilities with the formula in export.json, as predict does.

Every export checks itself: the exported file's outputs on the run's validation images must match the run's model
within 1e-4, or the export fails with the difference and leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from framework.errors import Issue, RunError
from framework.folders import ExportFolder, RunFolder
from framework.io import FileProblem, check_writable_folder

TOLERANCE = 1e-4
FORMATS = ExportFolder.MODEL_FILES


class Servable(torch.nn.Module):
    """The run's model as it predicts: uint8 images in; per task its logits, probabilities and (regression) number."""

    def __init__(self, run, tta: str | None):
        super().__init__()
        self.model, self.heads, self.tta = run.model, run.heads, tta
        self.parts = {t: lab.parts for t, lab in run.labels.items() if lab.parts}  # a composite head's questions
        self.sizes = {t: run.labels[t].sizes for t in self.parts}

    def names(self) -> list[str]:
        return [f"{t}.{part}" for t, h in self.heads.items()
                for part in ("logits", "probs") + (("value",) if h.learns == "number" else ())] + \
               [f"{q}.probs" for parts in self.parts.values() for q in parts]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from framework.models import outputs

        out = outputs(self.model, images, self.tta)
        result, probs = [], {}
        for task, head in self.heads.items():
            probs[task] = head.probs(out[task])
            value = head.value(out[task])  # the number of a head that learns one (names() lists it)
            result += [out[task].float(), probs[task]] + ([value] if value is not None else [])
        for task, sizes in self.sizes.items():  # each question's probabilities: the joint summed over the others
            joint, axes = probs[task].reshape(-1, *sizes), range(1, len(sizes) + 1)
            result += [joint.sum(dim=tuple(a for a in axes if a != k)) for k in axes]
        return tuple(result)


def export_run(run_path: str | Path, fmt: str = "onnx", out: str | Path | None = None, tta: str | None = None,
               log=print) -> dict:
    """Export the run's best checkpoint to `out` (default RUN/export-<fmt>); returns what export.json holds."""
    from framework.inference.run import load_run, resolve_tta

    run = load_run(run_path)
    out = Path(out) if out else run.run_dir / f"export-{fmt}"
    if out.exists() or out.is_symlink():
        raise RunError(Issue(f"{out} exists already.", field="--out", fix="remove it, or give another --out folder."))
    try:
        check_writable_folder(out.parent)
    except FileProblem as e:
        raise RunError(Issue(f"cannot write the export there: {e.path} {e.reason}.", field="--out",
                             fix="give an --out folder in a place you can write.")) from None
    tta = resolve_tta(run, tta)
    servable = Servable(run, tta).eval()
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        model_file = partial / FORMATS[fmt]
        _write_model(servable, model_file, fmt, _size(run))
        check = _check(servable, run, model_file, fmt)
        log(f"check: {check['on']}, max abs difference {check['max_abs_difference']:.2e} "
            f"(logits, probabilities, numbers; tolerance {TOLERANCE:g})")
        info = _describe(run, servable, model_file, fmt, tta, check)
        _write_folder(run, partial, info, tta)
        for f in partial.iterdir():
            f.chmod(0o644)  # (atomic writes make owner-only files; an export is made to be shared)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return info | {"out": out}


def _write_model(servable: Servable, path: Path, fmt: str, size: tuple[int, int]) -> None:
    h, w = size
    example = torch.zeros((2, 3, h, w), dtype=torch.uint8)
    with torch.no_grad():
        if fmt == "torchscript":
            with warnings.catch_warnings():  # torch 2.14 marks TorchScript deprecated; it still loads everywhere
                warnings.simplefilter("ignore", FutureWarning)
                torch.jit.trace(servable, example, check_trace=False).save(str(path))
            return
        _needs_onnx()
        try:
            torch.onnx.export(servable, (example,), str(path), dynamo=True, input_names=["images"],
                              output_names=servable.names(), dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                              external_data=False, verbose=False)  # one file, weights inside
        except Exception as e:  # the exporter's own report is long: its first line says what failed
            raise RunError(Issue(f"torch.onnx could not export this model: {_first_line(e)}", field="--format",
                                 fix="try --format torchscript; a plugin backbone may use an operation ONNX lacks."))


def _needs_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise RunError(Issue(f"ONNX export needs {' and '.join(missing)}, which are not installed.", field="--format",
                             fix='pip install -e ".[export]"  (or --format torchscript, which needs nothing more)'))


def _first_line(e: Exception) -> str:
    from framework.errors import shorten

    text = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return shorten(text, 300)


def _size(run) -> tuple[int, int]:
    """(h, w) of the model's input: the run's image size."""
    from framework.backbones import resolve_inputs

    return tuple(int(v) for v in resolve_inputs(run.recipe)[0])


def _check(servable: Servable, run, model_file: Path, fmt: str) -> dict:
    """The exported file against the run's model on its validation images (random images when none can be read,
    e.g. the data moved): the largest absolute difference of any output."""
    from framework.inference.exported import load_model
    from framework.inference.predict import prepared
    from framework.inference.run import run_boxes, split_rows

    paths = [r["path"] for r in split_rows(run, "val")]
    images, ok, _ = prepared(run, paths, run_boxes(run, paths))
    batches = [np.stack([np.ascontiguousarray(images[i]).transpose(2, 0, 1) for i in ok[s:s + 64]])
               for s in range(0, len(ok), 64)]
    if not batches:
        h, w = _size(run)
        batches = [np.random.default_rng(0).integers(0, 256, (8, 3, h, w), dtype=np.uint8)]
    exported, worst = load_model(model_file, fmt), 0.0
    for batch in batches:
        with torch.no_grad():
            want = [t.numpy() for t in servable(torch.from_numpy(batch))]
        got = exported(batch)
        if not all(np.isfinite(a).all() for a in got + want):
            raise RunError(Issue("the model gives NaN or infinite outputs on the check images.", field="RUN",
                                 fix="export a checkpoint whose training did not diverge (an earlier epoch's)."))
        worst = max([worst] + [float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(got, want)])
    what = f"{len(ok)} validation images" if ok else "8 random images (no validation image could be read)"
    if not worst <= TOLERANCE:
        raise RunError(Issue(f"the exported {fmt} model differs from the run's by up to {worst:.3g} on {what} "
                             f"(tolerance {TOLERANCE:g}).", field="--format",
                             fix="try the other --format, and report the backbone if both fail."))
    return {"images": len(ok), "on": what, "max_abs_difference": worst, "tolerance": TOLERANCE}


def _describe(run, servable: Servable, model_file: Path, fmt: str, tta: str | None, check: dict) -> dict:
    from framework.inference.priors import composite_counts, train_counts

    summary = RunFolder(run.run_dir).summary_or_none() or {}
    recipe_text = RunFolder(run.run_dir).recipe_file.read_bytes()
    labels = {t: lab.to_json() for t, lab in run.labels.items()}
    return {
        "format": fmt, "file": model_file.name,
        "input": {"name": "images", "dtype": "uint8", "layout": "NCHW", "channels": "RGB",
                  "size": list(_size(run)), "batch": "dynamic", "normalised": "inside the model"},
        "outputs": servable.names(),
        "tasks": {t: {"kind": h.kind, "classes": run.labels[t].classes} for t, h in run.heads.items()},
        "labels": labels, "questions": run.questions(), "composite": _composite(run),
        "tta": tta or "none", "train_counts": train_counts(run), "calibration": _calibration(run),
        "composite_counts": composite_counts(run, run.composite_order()) if run.composite_order() else None,
        "resize": run.recipe.transforms.resize.model_dump(mode="json"),
        "box_columns": [getattr(s, "box_columns", None) for s in run.recipe.data.sources],
        "source_run": {"name": run.name, "path": str(run.run_dir.resolve()), "checkpoint": run.checkpoint.name,
                       "status": summary.get("status"), "best_epoch": summary.get("best_epoch"),
                       "epochs_done": summary.get("epochs_done"),
                       "epochs": run.recipe.train.epochs},
        "finished": summary.get("status") == "finished",
        "recipe_sha256": hashlib.sha256(recipe_text).hexdigest(), "check": check,
        "versions": {"torch": torch.__version__},
    }


def _composite(run) -> dict | None:
    """The questions of the composite answer and its index formula (e.g. mask*6 + gender*3 + age), or None."""
    from framework.inference.predict import composite_of

    order = run.composite_order()
    return {"questions": order, "formula": composite_of(order, run.questions()).formula} if order else None


def _calibration(run) -> dict | None:
    """The run's calibration (BCTS per question, fitted on its validation split by `--prior-shift`), if stored."""
    return RunFolder(run.run_dir).calibration()


def _write_folder(run, folder: Path, info: dict, tta: str | None) -> None:
    """export.json, labels, the recipe (its eval.tta set to what the model has inside), the decision rule
    (re-stamped for the model file) and the model card."""
    from framework.inference import decision
    from framework.inference.card import model_card
    from framework.io import atomic_write_text, write_json
    from framework.recipe.loaded import resolved_yaml

    rule = decision.stored(run)
    recipe = run.recipe.model_copy(deep=True)
    recipe.eval.tta = tta
    out = ExportFolder(folder)
    atomic_write_text(out.file(out.RECIPE), resolved_yaml(recipe))
    write_json(out.file(out.LABELS), {t: lab.to_json() for t, lab in run.labels.items()})
    info["decision"] = None
    if rule is not None:
        exported = dataclasses.replace(run, run_dir=folder, checkpoint=folder / info["file"])
        write_json(out.file(out.DECISION), rule | {"checkpoint": decision.stamp(exported)})
        info["decision"] = {q: e.get("offsets") for q, e in rule["questions"].items()}
    write_json(out.file(out.INFO), info)
    atomic_write_text(out.file(out.CARD), model_card(run, info))
