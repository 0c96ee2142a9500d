"""Flow of solution procedure (Yim et al., CVPR 2017): match the Gram matrices between consecutive stages.

Registered as ``fsp`` and ``fsp+kd``, with the release's init stage (``methods/_init_stage.py``): the
student's stages are first trained on the FSP loss alone, then the whole student on CE (β = 0: the
release's main stage, ``helper/loops.py``, sets the FSP term to 0 whatever ``-b`` says).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods._init_stage import register_with_init


def fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """The FSP matrix of two maps: G[b, i, j] = (1/HW) Σ_hw bottom[b, i, h, w] · top[b, j, h, w],
    (B, C_bottom, C_top); the larger map is average-pooled to the smaller one's size first."""
    size = min(bottom.shape[-2], top.shape[-2]), min(bottom.shape[-1], top.shape[-1])
    bottom = F.adaptive_avg_pool2d(bottom.float(), size).flatten(2)  # (B, C_bottom, HW)
    top = F.adaptive_avg_pool2d(top.float(), size).flatten(2)  # (B, C_top, HW)
    with torch.autocast(bottom.device.type, enabled=False):  # in fp32 under bf16 autocast too
        return bottom @ top.transpose(1, 2) / bottom.shape[-1]  # (B, C_bottom, C_top)


class FSPLoss(nn.Module):
    """Flow of solution procedure (Yim et al., CVPR 2017, "A Gift from Knowledge Distillation").

    For consecutive stage outputs F^(k), F^(k+1) (post-ReLU, stages 0-4: four pairs), G^(k) =
    ``fsp_matrix``(F^(k), F^(k+1)); L = Σ_k mean_{b,i,j} (G_s^(k) − G_t^(k))². The paper sums the
    squared entries (λ_k equal) where RepDistiller's ``distiller_zoo/FSP.py`` averages them, and
    takes each section's first and last layer where the release takes consecutive stage outputs;
    we follow the release. The matrices are compared entry by entry, so the student's and
    teacher's stages must have the same channels. Its init stage trains on this same loss.
    """

    def __init__(self, stages: tuple[int, ...] = (0, 1, 2, 3, 4)):
        super().__init__()
        self.stages = stages

    def forward(self, s_feats: dict, t_feats: dict, **_) -> torch.Tensor:
        total = 0.0
        for lo, hi in zip(self.stages[:-1], self.stages[1:], strict=True):
            g_s = fsp_matrix(s_feats["stages"][lo], s_feats["stages"][hi])  # (B, C_lo, C_hi)
            g_t = fsp_matrix(t_feats["stages"][lo], t_feats["stages"][hi])  # (B, C_lo, C_hi)
            total = total + (g_s - g_t).pow(2).mean()
        return total

    def init_loss(self, s_feats: dict, t_feats: dict) -> torch.Tensor:
        return self(s_feats, t_feats)


def build_fsp(cfg, student: nn.Module, teacher: nn.Module, **_) -> FSPLoss:
    if list(student.stage_channels) != list(teacher.stage_channels):
        same_family = type(student) is type(teacher)
        fix = (
            "Give the student the teacher's widths (--width)"
            if same_family
            else "Use a student of the teacher's family"
        )
        raise ValueError(
            f"FSP compares the student's and the teacher's stage-to-stage matrices entry by entry, so their "
            f"stages need the same channels: student {list(student.stage_channels)}, teacher "
            f"{list(teacher.stage_channels)}. {fix}, or use a method with an adapter (ab, ft, fitnet)"
        )
    return FSPLoss()


register_with_init(
    "fsp",
    build_fsp,
    0.0,
    "Yim et al. 2017; RepDistiller distiller_zoo/FSP.py (stages 0-4, pairs of consecutive outputs, mean "
    "squared difference); main stage β 0: helper/loops.py sets loss_kd = 0 for fsp, so the -b 50 of "
    "scripts/run_cifar_distill.sh multiplies nothing",
)
