"""An export folder as a format: export.json (checked), the model file it names (inside the folder, a regular
file), labels, the recipe, the decision rule and the model card."""
from __future__ import annotations

import os
from pathlib import Path

from framework.folders.files import ExportInfo, checked, damaged, read_json

AGAIN = "export the run again: recipe export RUN --out DIR (do not edit the folder)."


class ExportFolder:
    INFO, LABELS, RECIPE, CARD = "export.json", "labels.json", "recipe.resolved.yaml", "MODEL_CARD.md"
    DECISION = "decision.json"
    MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def is_export(self) -> bool:
        return self.file(self.INFO).is_file()

    def info(self) -> tuple[dict, ExportInfo]:
        """export.json as written and as checked."""
        path = self.file(self.INFO)
        data = read_json(path, "the export description", fix=AGAIN)
        return data, checked(ExportInfo, data, path, "the export description", fix=AGAIN)

    def model_file(self, info: ExportInfo) -> Path:
        """The model file export.json names: a regular file inside this folder (a link out of it is refused)."""
        path = self.file(info.file)
        if not path.is_file():
            raise damaged(path, f"the model file {info.file} is missing.", field="file", fix=AGAIN)
        real, folder = os.path.realpath(path), os.path.realpath(self.path)
        if os.path.dirname(real) != folder:
            raise damaged(path, f"the model file leads out of the export folder (to {real}).", field="file", fix=AGAIN)
        return path
