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
from framework.tasks import head_states, load_head_states


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


def load_for_inference(model: torch.nn.Module, state: dict, path: Path) -> None:
    """Put a checkpoint's `model` weights into `model` (eval mode), refusing what would predict nonsense: tensors
    of other shapes or names (a checkpoint of another recipe), and weights that are not finite (a diverged or
    damaged run, whose every prediction would be one class at probability 1)."""
    from framework.errors import Issue, RunError

    weights = state["model"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise RunError(Issue(f"{path}: its `model` entry is not a set of named tensors.", field="model",
                             fix="give a checkpoint written by `recipe run` (train the run again)."))
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise RunError(Issue(f"{path}: {len(bad)} weight tensor(s) hold NaN or infinite values (e.g. {bad[0]}): "
                             "the run diverged or the file was damaged.", field="model",
                             fix="use an earlier checkpoint (checkpoints/epoch_NNNN.pt), or train again with a "
                                 "lower train.optimizer.lr."))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # missing / unexpected keys, size mismatches: another model's checkpoint
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e).splitlines()[0])
        raise RunError(Issue(f"{path} does not fit the model its run folder's recipe builds ({first[:300]}).",
                             field="model", fix="keep each checkpoint in the run folder it was trained in; "
                                                "train the run again if it was replaced.")) from None
    model.eval()


def training_state(built, epoch: int, best: dict) -> dict:
    """Everything needed to predict with the model (`model`) and to continue training exactly."""
    acc = built.accelerator
    train_model = acc.unwrap_model(built.model)
    return {"format": 1, "epoch": epoch, "best": best,
            "classes": {t: h.classes for t, h in built.heads.items()},
            "head_state": head_states(built.heads),  # thresholds, a regression head's scaling, fitted distributions
            "image_size": list(built.image_size),
            "backbone": built.loop.recipe["model"]["backbone"],
            "recipe": built.loop.recipe,  # what resume checks the run folder's recipe against
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
    from framework.errors import Issue, RunError

    acc = built.accelerator
    try:
        acc.unwrap_model(built.model).load_state_dict(state.get("train_model") or state["model"])
        if built.ema is not None:
            built.ema.load_state_dict(state["model"])
        built.optimizer.load_state_dict(state["optimizer"])
        built.scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), (str(e).splitlines() or [""])[0])
        raise RunError(Issue(f"the checkpoint does not fit this run's model or optimizer ({first[:300]}).",
                             field="--resume", fix="restore checkpoints/last.pt from a copy of the run folder, or "
                                                   "start the run again.")) from None
    if acc.scaler is not None and state.get("scaler"):
        acc.scaler.load_state_dict(state["scaler"])
    load_head_states(built.heads, state)
    return state["epoch"] + 1, state["best"], state.get("partial")


def save_epoch(run, state: dict, epoch: int, improved: bool, policy) -> None:
    """In the RunFolder `run`: last.pt always; best.pt when the monitored metric improved; epoch_NNNN.pt every
    `policy.save_every` epochs, the last `policy.keep_last` of them kept (`policy`: the run's LoopConfig)."""
    save(run.checkpoint("last"), state)
    if improved:
        save(run.checkpoint("best"), state)
    if policy.save_every and epoch % policy.save_every == 0:
        save(run.checkpoint(f"epoch_{epoch:04d}"), state)
        prune(run.checkpoints, policy.keep_last)


def prune(folder: Path, keep: int) -> None:
    numbered = sorted(folder.glob("epoch_*.pt"))
    for old in numbered[:-keep]:
        old.unlink(missing_ok=True)


def improved(value: float | None, best: dict, mode: str) -> bool:
    """Whether `value` beats the best so far (mode max or min)."""
    if value is None:
        return False
    return best["value"] is None or (value > best["value"] if mode == "max" else value < best["value"])


__all__ = ["save", "load", "load_for_inference", "training_state", "restore", "save_epoch", "prune", "improved"]
