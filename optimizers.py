"""The optimizer and learning-rate schedule a run's config asks for."""

from __future__ import annotations

import torch
from torch import nn

from config import Config


def build_optimizer(module: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Only parameters that require gradients: a frozen teacher can never get in."""
    params = [p for p in module.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )


def build_scheduler(optimizer, cfg: Config):
    """Stepped once per epoch."""
    if cfg.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestones, cfg.gamma)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
