"""Variational information distillation (Ahn et al., CVPR 2019): the student's maps must predict the teacher's.

Recipe, from the released code: stages 1-4 (RepDistiller ``train_student.py``, ``feat_s[1:-1]``;
mdistiller ``distillers/VID.py``, ``feats[1:]``), a three-layer 1x1-conv mean with hidden width C_t
(RepDistiller ``VIDLoss(s, t, t)``; mdistiller ``conv1x1(s, t), conv1x1(t, t), conv1x1(t, t)``),
variance initialised at 5 with ε = 1e-5 (RepDistiller ``distiller_zoo/VID.py`` defaults
``init_pred_var=5.0, eps=1e-5``; mdistiller ``engine/cfg.py`` ``VID.INIT_PRED_VAR``, ``VID.EPS``), β 1 with
CE 1 (RepDistiller ``scripts/run_cifar_distill.sh`` ``-b 1``; mdistiller ``VID.LOSS.FEAT_WEIGHT``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from methods._feature import register_feature
from registry import Param, positive

STAGES = (1, 2, 3, 4)


def conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)


def to_common_size(fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps at the smaller of their two sizes: the larger one is average-pooled down."""
    size = min(fs.shape[-1], ft.shape[-1])
    return F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size)


class VIDStage(nn.Module):
    """One stage's term of VID (Ahn et al., CVPR 2019): −log q(t | s) up to the constant ½·log 2π.

    q(t | s) = Π_{c,h,w} N(t_chw; μ_c(s)_hw, σ_c²), μ three bias-free 1x1 convs with ReLUs between
    (C_s → C_t → C_t → C_t), σ_c² = softplus(α_c) + ε one learned variance per teacher channel:

        L = mean_{b,c,h,w} ½·((μ_c(s) − t_c)² / σ_c² + log σ_c²)

    α starts at softplus⁻¹(v₀ − ε), so σ² starts at v₀. The variance is a parameter the optimizer
    trains, as the paper's variational family and RepDistiller (its ``VIDLoss`` is in the trained list)
    have it; mdistiller keeps its ``log_scales`` in a plain list that no optimizer sees, so there the
    variance stays at v₀. The larger map is average-pooled to the smaller size.
    """

    def __init__(self, c_s: int, c_t: int, init_var: float = 5.0, eps: float = 1e-5):
        super().__init__()
        if init_var <= eps:
            raise ValueError(f"vid_init_var={init_var} must exceed vid_eps={eps}: σ² = softplus(α) + ε starts at it")
        self.mean = nn.Sequential(conv1x1(c_s, c_t), nn.ReLU(), conv1x1(c_t, c_t), nn.ReLU(), conv1x1(c_t, c_t))
        self.alpha = nn.Parameter(torch.full((c_t,), math.log(math.expm1(init_var - eps))))
        self.eps = eps

    def variance(self) -> torch.Tensor:
        return F.softplus(self.alpha) + self.eps  # (C_t,)

    def forward(self, fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        fs, ft = to_common_size(fs, ft.float())
        mu = self.mean(fs)  # (B, C_t, H, W)
        var = self.variance()[:, None, None]  # (C_t, 1, 1)
        return 0.5 * ((mu - ft).pow(2) / var + var.log()).mean()


class VIDLoss(nn.Module):
    """Variational information distillation (Ahn et al., CVPR 2019): Σ_k of ``VIDStage`` on the
    post-ReLU outputs of stages 1-4, one mean network and one variance vector per stage."""

    def __init__(self, terms: dict[int, VIDStage]):
        super().__init__()
        self.stages = tuple(terms)
        self.terms = nn.ModuleList(terms.values())

    @classmethod
    def between(cls, student: nn.Module, teacher: nn.Module, init_var=5.0, eps=1e-5, stages=STAGES) -> VIDLoss:
        c_s, c_t = student.stage_channels, teacher.stage_channels
        return cls({k: VIDStage(c_s[k], c_t[k], init_var, eps) for k in stages})

    def forward(self, s_feats: dict, t_feats: dict, **_) -> torch.Tensor:
        total = 0.0
        for k, term in zip(self.stages, self.terms, strict=True):
            total = total + term(s_feats["stages"][k], t_feats["stages"][k])
        return total


PARAMS = (
    Param("vid_init_var", float, "VID: the variance σ² each teacher channel starts at", check=positive),
    Param("vid_eps", float, "VID: the floor ε added to the learned variance", check=positive),
)


def build_vid(cfg, student: nn.Module, teacher: nn.Module, **_) -> VIDLoss:
    return VIDLoss.between(student, teacher, cfg.vid_init_var, cfg.vid_eps)


register_feature(
    "vid",
    build_vid,
    1.0,
    "Ahn et al. 2019 (stages 1-4, 1x1-conv mean of hidden width C_t, variance starting at 5, ε 1e-5: "
    "RepDistiller distiller_zoo/VID.py and train_student.py, mdistiller distillers/VID.py and engine/cfg.py; "
    "β 1: RepDistiller scripts/run_cifar_distill.sh)",
    params=PARAMS,
    vid_init_var=5.0,
    vid_eps=1e-5,
)
