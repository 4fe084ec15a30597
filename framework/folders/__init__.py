"""Run and export folders as checked documents: one module owns every file's name, read and write."""
from framework.folders.export import ExportFolder
from framework.folders.files import damaged
from framework.folders.run import RunFolder, paths_outside_data

__all__ = ["ExportFolder", "RunFolder", "damaged", "paths_outside_data"]
