"""AdamW and the learning-rate schedule: linear warmup, then cosine, linear or constant."""

import math
from typing import Callable, Iterable

import torch
from torch import nn

from mft.config import OptimConfig, Schedule
from mft.utils.errors import MftError


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on 1-D tensors (norm scales)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise MftError("No trainable parameters: check peft.method and peft.target_modules.")
    decay = [p for _, p in trainable if p.ndim >= 2]
    no_decay = [p for _, p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True
    )


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """optim.warmup_steps, else warmup_ratio of the run's steps, else none (mft.train.checks
    admits at most one of the two)."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return int(round((cfg.warmup_ratio or 0.0) * total_steps))


def lr_multiplier(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """The factor applied to optim.lr at each step (step counts from 0)."""
    warmup = warmup_steps(cfg, total_steps)
    floor = cfg.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == Schedule.constant:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if cfg.schedule == Schedule.linear:
            return floor + (1.0 - floor) * (1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps))


def trainable_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    return (p for p in model.parameters() if p.requires_grad)
