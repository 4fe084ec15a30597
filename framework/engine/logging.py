"""Where a run's progress goes: the console line, metrics.jsonl, TensorBoard and Accelerate's trackers.

Only the main process writes; `RunLog` is built on every process and is silent on the others, so the loop never
asks "am I the main process?" itself.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from framework.data.labels import LabelSet
from framework.engine.metrics import flat_metrics, per_task, task_scores
from framework.folders import RunFolder
from framework.io import write_csv
from framework.processes import main_process


class RunLog:
    """The console (`say`), metrics.jsonl, TensorBoard and extra trackers of one run."""

    def __init__(self, built, run_dir: Path, labels: dict, say=print):
        self.built, self.run_dir, self.labels = built, run_dir, labels
        self.main = main_process()
        self.say = say if self.main else (lambda *_: None)
        self.writer = None

    def start(self, start_epoch: int) -> None:
        """Open TensorBoard (purging steps a resumed run redoes), trim metrics.jsonl, start the trackers."""
        loop, acc = self.built.loop, self.built.accelerator
        if self.main:
            if loop.tensorboard:
                self.writer = _writer(self.run_dir, self.built, self.labels, start_epoch)
            RunFolder(self.run_dir).trim_metrics(start_epoch)
        if acc.log_with:
            acc.init_trackers(self.run_dir.name, config=loop.recipe)

    def epoch(self, record: dict, best: dict, steps: dict | None = None) -> None:
        """The epoch's console line, metrics.jsonl line, TensorBoard scalars (and each training step's loss and
        learning rate, `steps`) and images, tracker values."""
        if self.main:
            self.say(console_line(record, best, self.built.loop.monitor, self.built.loop.epochs))
            RunFolder(self.run_dir).append_metrics(record)
            _log_tb(self.writer, record, self.labels, steps or {})
        if self.built.accelerator.log_with:
            flat = flat_metrics(record)
            self.built.accelerator.log({k: v for k, v in flat.items() if isinstance(v, (int, float))},
                                       step=record["epoch"])

    def image(self, tag: str, image: np.ndarray, epoch: int) -> None:
        """An (H, W, 3) uint8 image into TensorBoard (hooks use this)."""
        if self.writer is not None:
            self.writer.add_image(tag, image, epoch, dataformats="HWC")
            self.writer.flush()

    def skipped(self, skipped: list[tuple[str, str]]) -> None:
        if self.main and skipped:
            path = RunFolder(self.run_dir).file(RunFolder.SKIPPED)
            write_csv(path, ["path", "reason"], skipped)
            self.say(f"skipped {len(skipped)} unreadable image(s), listed in {path}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.built.accelerator.log_with:
            self.built.accelerator.end_training()


def console_line(record: dict, best: dict, monitor: str, epochs: int) -> str:
    t = record["train"]
    text = (f"epoch {record['epoch']}/{epochs}  train loss {t['loss']:.4f} acc {t['accuracy']:.3f} "
            f"f1 {t['macro_f1']:.3f}")
    if "val" in record:
        v = record["val"]
        text += f" | val loss {v['loss']:.4f} acc {v['accuracy']:.3f} f1 {v['macro_f1']:.3f}"
        tasks = task_scores(v)
        named = tasks if "" not in tasks else v.get("questions", {})  # (one composite head: its questions)
        if named:
            text += " (" + ", ".join(f"{t} {sc['macro_f1']:.3f}" for t, sc in named.items()) + ")"
        if "sources" in v:
            text += " [by source: " + ", ".join(f"{n} {sc['macro_f1']:.3f}" for n, sc in v["sources"].items()) + "]"
    if best["value"] is not None:
        text += f" | best {monitor} {best['value']:.4f} @{best['epoch']}"
    return text + f" | {t['images_per_sec']:.0f} img/s, {t['seconds']:.1f}s"


def _writer(run_dir: Path, built, labels: dict, start_epoch: int):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(RunFolder(run_dir).file(RunFolder.TB)), purge_step=start_epoch if start_epoch > 1 else None)
    if start_epoch == 1:
        import yaml
        text = yaml.safe_dump(built.loop.recipe, sort_keys=False)
        writer.add_text("recipe", "    " + text.replace("\n", "\n    "), 0)
        _sample_grid(writer, built, labels)
    return writer


def _sample_grid(writer, built, labels: dict) -> None:
    """What the model sees in epoch 1: a grid of augmented training images with their labels."""
    import torch

    from framework.engine.tb import sample_grid

    ds = built.loaders.train_ds
    n = min(built.loop.sample_grid, len(ds))
    if not n:
        return
    picks = np.linspace(0, len(ds) - 1, n).astype(int)
    items = [ds[(1, int(i))] for i in picks]
    heads = list(built.heads.values())
    names = []
    for _, y, _ in items:
        bands = [int(h.bands(torch.as_tensor(y, dtype=torch.float32)[None, j])[0]) for j, h in enumerate(heads)]
        names.append(LabelSet.joined(lab.classes[k] for lab, k in zip(labels.values(), bands) if k >= 0))
    writer.add_image("train/augmented_samples", sample_grid([im for im, _, _ in items], names), 0, dataformats="HWC")


def _log_tb(writer, record: dict, labels: dict, steps: dict) -> None:
    if writer is None:
        return
    from framework.engine.tb import confusion_image

    epoch = record["epoch"]
    for k, v in flat_metrics(record).items():
        writer.add_scalar(k, v, epoch)
    for k, v in class_scalars(record).items():
        writer.add_scalar(k, v, epoch)
    for i, (loss, lr) in enumerate(zip(steps.get("loss", []), steps.get("lr", []))):
        writer.add_scalar("train_step/loss", loss, steps["first"] + i)
        writer.add_scalar("train_step/lr", lr, steps["first"] + i)
    val = record.get("val")
    if val is not None:
        parts = per_task(val) | ({"composite": val["composite"]} if "composite" in val else {})
        if "" in parts:  # one task: its matrix under the run's own name
            sc = parts.pop("")
            writer.add_image("val/confusion_matrix", confusion_image(sc["confusion"], next(iter(labels.values())).classes),
                             epoch, dataformats="HWC")
        for task, sc in parts.items():
            writer.add_image(f"val/{task}/confusion_matrix", confusion_image(sc["confusion"], list(sc["per_class"])),
                             epoch, dataformats="HWC")
    writer.flush()


def class_scalars(record: dict) -> dict[str, float]:
    """Every class's validation precision, recall and F1 (`val/<task>/f1/<class>`, without the task for one task)."""
    val = record.get("val")
    if val is None:
        return {}
    parts = per_task(val)
    return {f"val/{t + '/' if t else ''}{m}/{c}": v[m] for t, sc in parts.items()
            for c, v in sc.get("per_class", {}).items() for m in ("precision", "recall", "f1") if m in v}
