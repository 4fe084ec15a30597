"""Backbone + head, with the input normalization inside the model and local weight files.

The model takes uint8 images (N, 3, H, W) and normalizes them itself with the backbone's mean/std (or the
recipe's), so training, evaluation and `predict` can never disagree about preprocessing.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import nn

from framework.backbones import backbone_defaults, fixed_input_size, plugin_backbone
from framework.errors import FieldError, shorten
from framework.registry import check_args
from framework.weights import resolve_file


class Net(nn.Module):
    """A backbone that yields features (N, feature_size) and one linear head per task."""

    def __init__(self, features: nn.Module, feature_size: int, heads: dict[str, int], drop_rate: float = 0.0):
        super().__init__()
        self.features = features
        self.drop = nn.Dropout(drop_rate)
        self.heads = nn.ModuleDict({task: nn.Linear(feature_size, n) for task, n in heads.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.drop(self.features(x))  # (N, feature_size)
        return {task: head(f) for task, head in self.heads.items()}  # task -> (N, classes of that task)


class Classifier(nn.Module):
    """Normalization + backbone + heads: takes uint8 images, returns each task's logits."""

    def __init__(self, net: Net, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.memory_format = torch.contiguous_format  # channels_last_(): the inputs' layout too

    def channels_last_(self) -> "Classifier":
        """Weights and inputs in the channels-last memory format (`model.channels_last`)."""
        self.memory_format = torch.channels_last
        return self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (images.float() - self.mean) / self.std  # (N, 3, H, W), uint8 0..255 in
        return self.net(x.contiguous(memory_format=self.memory_format))


def outputs(model: nn.Module, images: torch.Tensor, tta: str | None = None) -> dict[str, torch.Tensor]:
    """Each task's logits for a (N, 3, H, W) uint8 batch; with tta "hflip" the mean of the batch's and its mirror
    image's (the one definition validation, predict and evaluate share)."""
    out = model(images)
    if tta == "hflip":
        flipped = model(torch.flip(images, dims=[3]))  # mirror left-right; never up-down (faces)
        out = {t: (v + flipped[t]) / 2 for t, v in out.items()}
    return out


def build_model(model_cfg, heads: dict[str, int], mean, std,
                input_size: tuple[int, int] | None = None) -> tuple[Classifier, list[str]]:
    """The model with one head per task (`heads`: task -> number of classes), and notes about the weights.
    A backbone built for one input size only (ViT, Swin, MaxViT ...) is built for `input_size` (h, w)."""
    import timm

    backbone_defaults(model_cfg.backbone)  # checks the name, with a did-you-mean
    entry = plugin_backbone(model_cfg.backbone)
    notes: list[str] = []
    if entry is not None:
        options = check_args(entry, model_cfg.args, f"backbone {model_cfg.backbone!r}")  # checked at validate
        features = entry.load()(**(options.model_dump() if options is not None else {}))
        size = entry.meta["feature_size"]
        notes.append(f"backbone {model_cfg.backbone} from {entry.origin}")
    else:
        kwargs = dict(num_classes=0, drop_rate=model_cfg.drop_rate)  # num_classes=0: features, no classifier
        if model_cfg.drop_path_rate:
            kwargs["drop_path_rate"] = model_cfg.drop_path_rate
        kwargs.update(model_cfg.args)
        native = fixed_input_size(model_cfg.backbone)
        if native and input_size and tuple(input_size) != native and "img_size" not in model_cfg.args:
            kwargs["img_size"] = tuple(input_size)  # position embeddings / windows for this size
            notes.append(f"{model_cfg.backbone} built for {input_size[0]}x{input_size[1]} inputs "
                         f"(its default is {native[0]}x{native[1]})")
        try:
            features = timm.create_model(model_cfg.backbone, pretrained=model_cfg.pretrained, **kwargs)
        except TypeError as e:
            where = ("model", "args") if any(k in str(e) for k in model_cfg.args) else ("model",)
            raise FieldError(where, f"{model_cfg.backbone} does not accept these options: {e}.",
                             "remove drop_path_rate or the model.args key named (not every backbone has "
                             "them; timm's model page lists what it takes).") from None
        except Exception as e:  # hub download failed (offline), or the backbone has no hub weights
            if not model_cfg.pretrained:
                raise
            raise FieldError(("model", "pretrained"), f"hub weights for {model_cfg.backbone!r} cannot be loaded "
                             f"here ({type(e).__name__}: {shorten(str(e))}).",
                             "download the weights elsewhere and set model.weights: path/to/file.safetensors "
                             "with pretrained: false.") from None
        # the pooled features' width: after a conv head (mobilenetv3, lcnet, ghostnet ...) it is not num_features
        size = getattr(features, "head_hidden_size", None) or features.num_features
        if model_cfg.pretrained:
            notes.append(f"hub weights of {model_cfg.backbone} loaded")
    net = Net(features, size, heads, model_cfg.drop_rate if entry is not None else 0.0)
    if model_cfg.weights:
        notes += load_weights(net, resolve_file(model_cfg.weights, model_cfg.backbone), model_cfg.weights)
    model = Classifier(net, mean, std)
    return (model.channels_last_() if model_cfg.channels_last else model), notes


def size_problem(model_cfg, size: tuple[int, int]) -> str | None:
    """One forward pass of two blank images of this size through the backbone built on the meta device (shapes
    only: no memory, no arithmetic, no weights): None if it takes them, else what it raised. A backbone that cannot
    be built on the meta device (some plugins) passes: the real build will tell."""
    cfg = model_cfg.model_copy(update={"weights": None, "pretrained": False, "compile": False, "channels_last": False})
    try:
        with torch.device("meta"):
            model, _ = build_model(cfg, {"check": 1}, (0.5,) * 3, (0.5,) * 3, size)
    except FieldError:
        raise
    except Exception:  # noqa: BLE001
        return None
    try:
        with torch.no_grad(), torch.device("meta"):
            model.eval()(torch.zeros(2, 3, *size, dtype=torch.uint8))
    except Exception as e:  # noqa: BLE001 - whatever the backbone raises: the size is the cause either way
        return f"{type(e).__name__}: {e}"
    return None


def unreadable_torch_file(path: Path, e: Exception) -> tuple[str, str]:
    """What a file that `torch.load(weights_only=True)` refused is, and the fix: pickled objects (refused, since
    loading them runs code), a plain pickle, a truncated or damaged file, or something else."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    if found:  # e.g. torch.save(model): unpickling it would run the code of its classes
        return (f"it holds pickled Python objects ({found.group(1)}), e.g. a whole model saved with "
                "torch.save(model); they are refused, since loading them runs code",
                "save the weights alone where the model was made: torch.save(model.state_dict(), path) or "
                "safetensors' save_file; never load such a file from a source you do not trust")
    try:
        head = path.read_bytes()[:2] if path.stat().st_size else b""
    except OSError:
        head = b""
    if head[:1] == b"\x80":
        return ("it is a plain Python pickle, not a PyTorch file; it is refused, since loading it runs code",
                "save tensors with torch.save(state_dict, path) or safetensors' save_file")
    if head == b"PK":
        return "it is a PyTorch file that is truncated or damaged", "copy it again (or train again)"
    return "it is not a PyTorch file (nor safetensors)", "give a .safetensors file or a state_dict saved with torch.save"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or a torch file loaded with weights_only=True (no code runs)."""
    p = Path(path)
    if not p.is_file():
        raise FieldError(("model", "weights"), f"weights file not found: {p}.",
                         "give a local .safetensors/.pth file, or a run's checkpoints/best.pt (train that run first).")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(p))
        else:
            with warnings.catch_warnings():  # (torch warns about a plain pickle's protocol before refusing it)
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        what, fix = unreadable_torch_file(p, e)
        raise FieldError(("model", "weights"), f"cannot use {p}: {what}.", fix) from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise FieldError(("model", "weights"), f"{p} holds no state_dict.", "save model.state_dict().")
    if all(k.startswith("net.") for k in state if k not in ("mean", "std")):  # a checkpoint of this framework
        state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    return {k.removeprefix("module."): v for k, v in state.items()}


def fitting_tensors(net, state: dict, path) -> tuple[dict, list[str], dict]:
    """The tensors of `state` that fit `net` (by name and shape), the names whose shapes differ, and the state as
    named for `net`. A file none of whose weight tensors fits (only counters such as BatchNorm's
    num_batches_tracked would) is for another model: an error, not a run from scratch. Weights must be finite."""
    if not any(k.startswith(("features.", "heads.")) for k in state):
        state = {f"features.{k}": v for k, v in state.items()}
    own = net.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    mismatched = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    if not any(own[k].is_floating_point() and own[k].numel() > 1 for k in fitting):
        raise FieldError(("model", "weights"), f"no weight tensor of {path} fits {net.features.__class__.__name__} "
                         f"({len(mismatched)} of the same name have other shapes, e.g. "
                         f"{(mismatched or list(state) or ['-'])[0]!r}): it is another model's file.",
                         "give weights of this backbone (or change model.backbone to the file's).")
    bad = [k for k, v in fitting.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise FieldError(("model", "weights"), f"{path}: tensor {bad[0]} holds NaN or infinite values.",
                         "give weights from a run that did not diverge.")
    return fitting, mismatched, state


def check_weights_fit(model_cfg, path, size: tuple[int, int]) -> None:
    """The weights file fits the backbone (names and shapes, on the meta device: no memory, no arithmetic)."""
    cfg = model_cfg.model_copy(update={"weights": None, "pretrained": False, "compile": False, "channels_last": False})
    try:
        with torch.device("meta"):
            model, _ = build_model(cfg, {}, (0.5,) * 3, (0.5,) * 3, size)
    except Exception:  # noqa: BLE001 - a backbone that cannot be built on the meta device: the real build tells
        return
    fitting_tensors(model.net, read_state_dict(path), path)


def load_weights(net: Net, path: Path, name: str | None = None) -> list[str]:
    """Load what fits; report tensors re-initialised (missing or shape mismatch) and ignored (unexpected).
    `name` is what the recipe wrote (a weight source's name, or the path).

    A checkpoint of this framework fills backbone and heads; a plain backbone state_dict (timm's layout, e.g.
    face-task weights) fills the backbone, and its classifier is ignored."""
    state = read_state_dict(path)
    fitting, mismatched, state = fitting_tensors(net, state, path)
    own = net.state_dict()
    result = net.load_state_dict(fitting, strict=False)
    shown = path if name in (None, str(path)) else f"{name} ({path})"
    notes = [f"loaded {len(fitting)}/{len(own)} tensors from {shown}"]
    if mismatched or result.missing_keys:
        notes.append("re-initialised (head or shape mismatch): " + ", ".join(sorted(set(mismatched) | set(result.missing_keys))[:12]))
    if result.unexpected_keys or [k for k in state if k not in own]:
        notes.append("ignored (not in this model): " + ", ".join(sorted(k for k in state if k not in own)[:12]))
    return notes
