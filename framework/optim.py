"""Optimizer, learning-rate schedule and the weight average (EMA): the recipe's `train` section as objects."""
from __future__ import annotations

import copy
import math

import torch


def build_optimizer(model, train_cfg) -> torch.optim.Optimizer:
    """The optimizer over the model's parameters: one group, or with `train.finetune` two (backbone, then the
    rest), the backbone's at `backbone_lr_scale` times the learning rate."""
    opt_cfg, ft = train_cfg.optimizer, train_cfg.finetune
    params = model.parameters()
    if ft.active:
        backbone = {id(p) for p in model.net.features.parameters()}
        params = [{"params": [p for p in model.parameters() if id(p) in backbone], "lr": opt_cfg.lr * ft.backbone_lr_scale},
                  {"params": [p for p in model.parameters() if id(p) not in backbone]}]
    if opt_cfg.name == "sgd":
        return torch.optim.SGD(params, lr=opt_cfg.lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay,
                               nesterov=opt_cfg.nesterov)
    return torch.optim.AdamW(params, lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay, betas=opt_cfg.betas)


def lr_lambda(sched, steps_per_epoch: int, total_steps: int):
    """Multiplier of the base learning rate at optimizer step `s` (0-based)."""
    if sched.name == "constant":
        return lambda s: 1.0
    if sched.name == "step":
        return lambda s: sched.gamma ** ((s // max(1, steps_per_epoch)) // sched.every_epochs)
    warm = int(sched.warmup_epochs * steps_per_epoch)

    def cosine(s):
        if s < warm:
            return (s + 1) / (warm + 1)
        t = (s - warm) / max(1, total_steps - warm)
        return sched.min_lr_ratio + (1 - sched.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return cosine


def build_scheduler(optimizer, train_cfg, batches_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of `train.scheduler`, stepped once per optimizer step."""
    steps_per_epoch = math.ceil(batches_per_epoch / train_cfg.grad_accum)
    f = lr_lambda(train_cfg.scheduler, steps_per_epoch, steps_per_epoch * train_cfg.epochs)
    if not train_cfg.finetune.active:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, f)
    frozen = train_cfg.finetune.freeze_epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s: 0.0 if s < frozen else f(s), f])


def backbone_bn_eval(model: torch.nn.Module, frozen: bool) -> None:
    """After model.train(): the backbone's batch norm keeps its statistics (eval mode) when `frozen`
    (train.finetune: `freeze_bn`, or an epoch within `freeze_epochs`)."""
    if frozen:
        for m in model.net.features.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def ema_copy(model: torch.nn.Module) -> torch.nn.Module:
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * model, with d = min(decay, (1 + step) / (10 + step)) so that the first steps
    are not dominated by the random initial weights; integer buffers (batch counts) are copied."""
    d = min(decay, (1 + step) / (10 + step))
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.lerp_(m.detach(), 1 - d)
        else:
            e.copy_(m)
