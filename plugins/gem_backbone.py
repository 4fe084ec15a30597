"""Example plugin: timm ResNets with generalized-mean (GeM) pooling and a batch-norm neck, as used for face
recognition features. Load face-task weights from a local file with the recipe's `model.weights`.

    plugins: [../plugins/gem_backbone.py]
    model: {backbone: gem_resnet18, weights: face_task.safetensors, args: {p: 4.0}}

`model.args` are checked at `recipe validate` by the args model registered with the backbone (GemArgs).
"""
from __future__ import annotations

import timm
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from framework.registry import BACKBONES


class GemArgs(BaseModel):
    """What `model.args` may give a GeM backbone."""

    model_config = ConfigDict(extra="forbid")
    p: float = Field(3.0, gt=0, le=20, description="the starting GeM power (learnt): 1 = average pooling, "
                                                    "larger = closer to max pooling")


class GeM(nn.Module):
    """Generalized mean pooling: p = 1 is average pooling, large p approaches max pooling; p is learned."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3))  # (N, C, H, W) -> (N, C)
        return pooled.pow(1.0 / self.p)


def _gem(name: str, p: float) -> nn.Module:
    trunk = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")  # (N, C, h, w)
    return nn.Sequential(trunk, GeM(p), nn.BatchNorm1d(trunk.num_features))  # (N, C)


@BACKBONES.register("gem_resnet18", feature_size=512, input_size=(112, 112), args=GemArgs)
def gem_resnet18(p: float = 3.0) -> nn.Module:
    return _gem("resnet18", p)


@BACKBONES.register("gem_test_resnet", feature_size=96, input_size=(64, 64), args=GemArgs)
def gem_test_resnet(p: float = 3.0) -> nn.Module:
    """A tiny variant for tests and quick checks."""
    return _gem("test_resnet", p)
