"""What a backbone is, without building it: its native input size, mean and std, whether it takes one size only,
where its hub weights are, and whether it can take a given image size.

The answers come from a plugin's registration or from timm. timm's answers are kept in a small JSON file per timm
and torch version (`$RECIPE_CACHE/timm/`, else `~/.cache/recipe/timm/`), so `recipe validate` imports neither
timm nor torch when it has seen the backbone before (importing them is 3-4 s of a 5 s validate). A missing,
unreadable or damaged cache file is just a miss: the answer is computed again and the file rewritten.
"""
from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

from framework.errors import FieldError, did_you_mean

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
_MEMO: dict[Path, dict] = {}


def cache_file() -> Path:
    """This timm and torch version's answers."""
    versions = []
    for package in ("timm", "torch"):
        try:
            versions.append(f"{package}-{metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package}-none")
    root = Path(os.environ.get("RECIPE_CACHE") or Path.home() / ".cache" / "recipe")
    return root / "timm" / ("_".join(versions) + ".json")


def _answers() -> dict:
    path = cache_file()
    if path not in _MEMO:
        from framework.io import FileProblem, read_text

        try:
            data = json.loads(read_text(path, limit=16 << 20))
            if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
                raise ValueError("not this cache's layout")
        except (FileProblem, ValueError, RecursionError):
            data = {}  # missing or damaged: start again
        _MEMO[path] = data
    return _MEMO[path]


def remembered(kind: str, key: str, compute, sound=lambda answer: True):
    """The cached answer to a question about timm backbones (`kind`: a group of questions), else `compute()`'s,
    cached. Answers are JSON values; one that is not `sound` (a damaged or edited file) is computed again."""
    answers = _answers().get(kind, {})
    if key in answers and sound(answers[key]):
        return answers[key]
    answer = compute()
    _remember(kind, key, answer)
    return answer


def _remember(kind: str, key: str, answer) -> None:
    from framework.errors import RunError
    from framework.io import atomic_write_text

    data = _answers()
    data.setdefault(kind, {})[key] = answer
    try:
        atomic_write_text(cache_file(), json.dumps(data, sort_keys=True))
    except (OSError, RunError):  # a read-only home or a full disk: the answers are still right, only slower next time
        pass


def plugin_backbone(name: str):
    """The registry entry of a plugin backbone, or None for a timm name."""
    from framework.registry import BACKBONES

    if name not in BACKBONES:
        return None
    entry = BACKBONES.get(name)
    missing = [k for k in ("feature_size", "input_size") if k not in entry.meta]
    if missing:
        raise FieldError(("model", "backbone"), f"plugin backbone {name!r} ({entry.origin}) does not say its "
                         f"{' and '.join(missing)}.", f"register it with @BACKBONES.register({name!r}, "
                         "feature_size=..., input_size=(h, w)).")
    return entry


def _sound_facts(facts) -> bool:
    def numbers(v, n, kind, least):
        return isinstance(v, list) and len(v) == n and all(isinstance(x, kind) and x >= least for x in v)

    return (isinstance(facts, dict) and numbers(facts.get("input_size"), 2, int, 1)
            and numbers(facts.get("mean"), 3, (int, float), 0) and numbers(facts.get("std"), 3, (int, float), 1e-6)
            and isinstance(facts.get("fixed"), bool)
            and all(facts.get(k) is None or isinstance(facts[k], str) for k in ("hub_id", "url", "hub_file")))


def timm_facts(name: str) -> dict:
    """timm's pretrained config of a model, as plain values (cached); a located error for an unknown name."""
    return remembered("facts", name, lambda: _ask_timm(name), _sound_facts)


def _ask_timm(name: str) -> dict:
    import timm

    if not timm.is_model(name):
        from framework.registry import BACKBONES

        choices = timm.list_models() + BACKBONES.names()
        raise FieldError(("model", "backbone"), f"unknown backbone {name!r}.{did_you_mean(name, choices)}",
                         "use a timm model name (see timm.list_models()), e.g. resnet18, or one registered by "
                         "a plugin (`recipe plugins`).")
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None:
        return {"input_size": [224, 224], **{k: list(v) for k, v in IMAGENET.items()}, "fixed": False,
                "hub_id": None, "url": None, "hub_file": None}
    return {"input_size": [int(x) for x in cfg.input_size[1:]], "mean": [float(x) for x in cfg.mean],
            "std": [float(x) for x in cfg.std], "fixed": bool(cfg.fixed_input_size), "hub_id": cfg.hf_hub_id or None,
            "url": cfg.url or None, "hub_file": cfg.hf_hub_filename or None}


def backbone_defaults(name: str) -> dict:
    """The backbone's own input size (h, w) and mean/std: a plugin's registration, or timm's pretrained config."""
    entry = plugin_backbone(name)
    if entry is not None:
        size = entry.meta["input_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        return {"input_size": size, "mean": tuple(entry.meta.get("mean", IMAGENET["mean"])),
                "std": tuple(entry.meta.get("std", IMAGENET["std"]))}
    facts = timm_facts(name)
    return {"input_size": tuple(facts["input_size"]), "mean": tuple(facts["mean"]), "std": tuple(facts["std"])}


def fixed_input_size(name: str) -> tuple[int, int] | None:
    """The one input size (h, w) a timm backbone is built for, when it has one (ViT, Swin ...); else None."""
    if plugin_backbone(name) is not None:
        return None
    facts = timm_facts(name)
    return tuple(facts["input_size"]) if facts["fixed"] else None


def resolve_inputs(recipe) -> tuple[tuple[int, int], tuple, tuple]:
    """Input size (h, w) and normalization mean/std of a recipe's model: the recipe's, else the backbone's own
    (as timm's `resolve_data_config` does). Training, prediction and review all ask here."""
    from framework.transforms import image_size_of
    from framework.weights import source as weight_source

    defaults = backbone_defaults(recipe.model.backbone)
    src = weight_source(recipe.model.weights) if recipe.model.weights else None
    if src is not None:  # the weights' own normalization and native size
        defaults = {**defaults, **src.info(recipe.model.backbone)}
    size = image_size_of(recipe.transforms, defaults["input_size"])
    norm = recipe.transforms.normalize
    mean, std = (norm.mean, norm.std) if norm else (defaults["mean"], defaults["std"])
    return size, mean, std


def check_pretrained(model_cfg) -> None:
    """`model.pretrained: true` offline (the CLI's default, HF_HUB_OFFLINE=1) needs the hub weights in the local
    cache: else a located error now, before a run folder exists, instead of a failed run."""
    if not model_cfg.pretrained or plugin_backbone(model_cfg.backbone) is not None:
        return
    facts = timm_facts(model_cfg.backbone)
    if not (facts["hub_id"] or facts["url"]):
        raise FieldError(("model", "pretrained"), f"{model_cfg.backbone} has no hub weights in timm.",
                         "set pretrained: false (and model.weights: a local file, if you have one).")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes") or not facts["hub_id"]:
        return
    from huggingface_hub import try_to_load_from_cache

    names = [facts["hub_file"]] if facts["hub_file"] else ["model.safetensors", "pytorch_model.bin"]
    if not any(isinstance(try_to_load_from_cache(facts["hub_id"], n), str) for n in names):
        raise FieldError(("model", "pretrained"), f"the hub weights of {model_cfg.backbone} ({facts['hub_id']}) "
                         "are not in the local Hugging Face cache, and hub downloads are off (HF_HUB_OFFLINE=1, "
                         "which `recipe` sets unless you set it yourself).",
                         "with internet, run with HF_HUB_OFFLINE=0 once; without, set model.weights to a local file "
                         "(weights: imagenet for tf_efficientnet_lite0/1/2) and pretrained: false.")
