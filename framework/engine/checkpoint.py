"""Checkpoints: what a training state holds, saving it (atomically) by the recipe's policy, and its inverse.

Policy: `last.pt` every epoch, `best.pt` when the monitored metric improves, `epoch_NNNN.pt` every N epochs (the
newest `keep_last` kept). Restore puts a saved state back into the built objects, so the resumed run continues
exactly where the straight one would be.
"""
from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import torch

from framework.io import atomic_write_bytes
from framework.tasks import load_head_states, set_targets


def save(path: Path, state: dict) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def load(path: Path) -> dict:
    """A training checkpoint (tensors, numbers, strings and RNG states only; no code is unpickled). A file that is
    not one (pickled objects, a damaged or foreign file) is a RunError that says what it is."""
    from framework.errors import Issue, RunError
    from framework.models import unreadable_torch_file

    try:
        with warnings.catch_warnings():  # (torch warns about a plain pickle's protocol before refusing it)
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch raises, the user gets what the file is
        what, fix = unreadable_torch_file(Path(path), e)
        raise RunError(Issue(f"cannot use the checkpoint {path}: {what}.", fix=fix)) from None
    if not isinstance(state, dict) or "model" not in state:
        raise RunError(Issue(f"{path} is not a checkpoint of this framework (no `model` state).",
                             fix="give a run folder made by `recipe run`, or a checkpoint inside one."))
    return state


def training_state(built, epoch: int, best: dict) -> dict:
    """Everything needed to predict with the model (`model`) and to continue training exactly."""
    acc, recipe = built.accelerator, built.recipe
    train_model = acc.unwrap_model(built.model)
    return {"format": 1, "epoch": epoch, "best": best,
            "classes": {t: h.classes for t, h in built.heads.items()},
            "thresholds": {t: h.threshold for t, h in built.heads.items() if h.chooses_threshold},
            "targets": {t: [h.center, h.scale] for t, h in built.heads.items() if h.regression},
            "head_state": {t: h.state() for t, h in built.heads.items() if h.state() is not None},
            "image_size": list(built.image_size),
            "backbone": recipe.model.backbone,
            "recipe": recipe.model_dump(mode="json"),  # what resume checks the run folder's recipe against
            # `model` is what predictions use (the average with train.ema); `train_model` what training resumes
            "model": (built.ema if built.ema is not None else train_model).state_dict(),
            "train_model": train_model.state_dict() if built.ema is not None else None,
            "optimizer": built.optimizer.state_dict(),
            "scheduler": built.scheduler.state_dict(), "scaler": acc.scaler.state_dict() if acc.scaler else None,
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                    "numpy": np.random.get_state()[1].tolist()}}


def restore(built, state: dict) -> tuple[int, dict, dict | None]:
    """Put a saved state back into the built objects; returns (first epoch to train, best so far, the partial
    epoch an interrupted run stopped in)."""
    acc = built.accelerator
    acc.unwrap_model(built.model).load_state_dict(state.get("train_model") or state["model"])
    if built.ema is not None:
        built.ema.load_state_dict(state["model"])
    built.optimizer.load_state_dict(state["optimizer"])
    built.scheduler.load_state_dict(state["scheduler"])
    if acc.scaler is not None and state.get("scaler"):
        acc.scaler.load_state_dict(state["scaler"])
    for task, t in state.get("thresholds", {}).items():
        built.heads[task].threshold = t
    set_targets(built.heads, state.get("targets"))
    load_head_states(built.heads, state)
    return state["epoch"] + 1, state["best"], state.get("partial")


def save_epoch(folder: Path, state: dict, epoch: int, improved: bool, policy) -> None:
    """last.pt always; best.pt when the monitored metric improved; epoch_NNNN.pt every `policy.every` epochs."""
    save(folder / "last.pt", state)
    if improved:
        save(folder / "best.pt", state)
    if policy.every and epoch % policy.every == 0:
        save(folder / f"epoch_{epoch:04d}.pt", state)
        prune(folder, policy.keep_last)


def prune(folder: Path, keep: int) -> None:
    numbered = sorted(folder.glob("epoch_*.pt"))
    for old in numbered[:-keep]:
        old.unlink(missing_ok=True)


def improved(value: float | None, best: dict, mode: str) -> bool:
    """Whether `value` beats the best so far (mode max or min)."""
    if value is None:
        return False
    return best["value"] is None or (value > best["value"] if mode == "max" else value < best["value"])


__all__ = ["save", "load", "training_state", "restore", "save_epoch", "prune", "improved"]
