"""Curriculum temperature (Li et al., AAAI 2023): KD at a learned temperature that plays against the student."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from methods.kd import LOGIT_STAND, kd_loss, standardized
from registry import ALPHA, CE_WEIGHT, KD_WEIGHT, Param, non_negative, register_method


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by −λ (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lam * grad, None


def reverse_gradient(x: torch.Tensor, lam: float) -> torch.Tensor:
    """``x``, whose gradient flows back multiplied by −λ: what minimises after it maximises before it."""
    return _ReverseGradient.apply(x, lam)


def reversal_strength(epoch: int, loops: float) -> float:
    """λ at a 0-based epoch: (1 − cos(π·min(epoch + 1, loops)/loops))/2, rising from ≈0 to 1 over
    ``loops`` epochs, then 1 (the release counts epochs from 1; ``loops`` 0: 1 throughout)."""
    if loops <= 0:
        return 1.0
    return (1 - math.cos(math.pi * min(epoch + 1, loops) / loops)) / 2


class GlobalTemperature(nn.Module):
    """One learnable temperature τ = t_min + t_span · σ(θ) ∈ (t_min, t_min + t_span), θ trained by
    the loop's optimizer (it is a parameter of the loss) through a gradient reversal of strength λ.
    The release starts θ at 1 (τ ≈ 15.6 with its range (1, 21))."""

    def __init__(self, t_min: float = 1.0, t_span: float = 20.0, theta: float = 1.0):
        super().__init__()
        self.t_min, self.t_span = t_min, t_span
        self.theta = nn.Parameter(torch.tensor(float(theta)))

    def forward(self, lam: float) -> torch.Tensor:
        return self.t_min + self.t_span * torch.sigmoid(reverse_gradient(self.theta, lam))

    @property
    def value(self) -> float:
        """τ now (for logs and tests)."""
        return float(self.t_min + self.t_span * torch.sigmoid(self.theta.detach()))


class CTKDLoss(nn.Module):
    """Li, Li, Yang, Zhao, Song, Luo, Li & Yang, AAAI 2023, "Curriculum Temperature for Knowledge
    Distillation" (global temperature).

    L = w_ce · CE(z_s, y) + w_kd · τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ)), τ learned: the student
    minimises L while τ, behind a gradient-reversal layer, maximises it with strength λ, so the task
    gets harder as λ rises (easy to hard). λ follows a cosine curriculum from 0 to 1 over the first
    ``loops`` epochs (``set_epoch``; ``reversal_strength``). Returns ``{"ce", "kd"}``, weighted.

    Released recipe (zhengli97/CTKD ``scripts/run_cifar_distill.sh`` on ``train_student.py``; the
    same in LS-KD's ``CTKD/``): ``-r 0.1 -a 0.9`` (w_ce 0.1, w_kd 0.9), ``--have_mlp 1 --mlp_name
    global`` (``models/temp_global.py``: θ = 1, the reversal layer), ``--t_start 1 --t_end 20``
    (τ = 1 + 20·σ(θ), in (1, 21); ``helper/loops.py``), ``--cosine_decay 1 --decay_max 0 --decay_min
    -1 --decay_loops 10`` (λ from 0 to 1 over 10 epochs, ``CosineDecay`` in ``train_student.py``).
    θ is trained by the student's SGD, with its learning rate and weight decay, as here.

    ``logit_stand``: the KD term on z-scored logits, CE on the raw ones (Sun et al. 2024). Their
    ``CTKD/train_student.py`` inverts its flag (plain KD *with* ``--logit_stand``, standardised
    without it; their issue #15); here on means standardised. Their CTKD+LS runs use w_kd 9
    (``scripts/run_cifar_distill.sh``: ``-r 0.1 -a 9``; logs ``ctkd,vgg13,vgg8,2,9``).
    """

    def __init__(
        self,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
        loops: float = 10.0,
        logit_stand: bool = False,
        t_min: float = 1.0,
        t_span: float = 20.0,
    ):
        super().__init__()
        if ce_weight < 0 or kd_weight < 0 or loops < 0:
            raise ValueError(f"need weights and loops >= 0, got {ce_weight=}, {kd_weight=}, {loops=}")
        self.ce_weight, self.kd_weight, self.loops, self.logit_stand = ce_weight, kd_weight, loops, logit_stand
        self.temperature = GlobalTemperature(t_min, t_span)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.lam = reversal_strength(epoch, self.loops)

    def forward(self, logits_s, logits_t, target, **_) -> dict[str, torch.Tensor]:
        tau = self.temperature(self.lam)
        return {
            "ce": self.ce_weight * F.cross_entropy(logits_s, target),
            "kd": self.kd_weight * kd_loss(*standardized(logits_s, logits_t, self.logit_stand), tau),
        }


PARAMS = (
    CE_WEIGHT,
    KD_WEIGHT,
    ALPHA,
    Param(
        "ctkd_loops",
        float,
        "CTKD: epochs over which the temperature's gradient reversal λ rises from 0 to 1 (cosine; the release: "
        "10 of 240)",
        check=non_negative,
    ),
    LOGIT_STAND,
)


@register_method(
    "ctkd",
    source="Li et al. 2023; zhengli97/CTKD scripts/run_cifar_distill.sh (-r 0.1 -a 0.9, --t_start 1 --t_end 20, "
    "cosine λ 0 to 1 over --decay_loops 10) on train_student.py, models/temp_global.py (θ 1), helper/loops.py",
    params=PARAMS,
    ce_weight=0.1,
    kd_weight=0.9,
    ctkd_loops=10.0,
)
def build(cfg, student: nn.Module, teacher: nn.Module, **_) -> nn.Module:
    return CTKDLoss(cfg.ce_weight, cfg.kd_weight, cfg.ctkd_loops, cfg.logit_stand)
