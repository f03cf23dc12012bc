"""Learning-rate schedules and parameter groups."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from mft.config import OptimConfig
from mft.train.optim import build_optimizer, lr_multiplier


def optim_cfg(**kw):
    """Typed and checked as Hydra does, then the dataclass mft-train passes down."""
    return OmegaConf.to_object(OmegaConf.structured(OptimConfig(**kw)))


def test_warmup_then_cosine_to_floor():
    f = lr_multiplier(optim_cfg(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1)


def test_linear_and_constant_and_warmup_ratio():
    linear = lr_multiplier(optim_cfg(schedule="linear", warmup_ratio=0.1), total_steps=100)
    assert linear(9) == pytest.approx(1.0) and linear(55) == pytest.approx(0.5) and linear(100) == 0.0
    constant = lr_multiplier(optim_cfg(schedule="constant"), total_steps=100)
    assert constant(0) == constant(99) == 1.0


def test_unknown_schedule_is_an_error():
    # warmup_steps with warmup_ratio is refused by mft.train.checks (tests/test_config_checks.py).
    with pytest.raises(ValidationError, match="cosine"):  # an unknown schedule fails when the config is typed
        optim_cfg(schedule="step")


def test_no_weight_decay_on_norm_scales():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.LayerNorm(4, bias=False))
    opt = build_optimizer(model, optim_cfg(weight_decay=0.1))
    decays = sorted((g["weight_decay"], [p.ndim for p in g["params"]]) for g in opt.param_groups)
    assert decays == [(0.0, [1]), (0.1, [2])]
