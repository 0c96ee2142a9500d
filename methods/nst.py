"""Neuron selectivity transfer (Huang & Wang, 2017): match the distributions of the two networks' channel maps.

Recipe, from the released code: the polynomial kernel k(x, y) = (xᵀy)² (d 2, c 0) on the
post-ReLU outputs of stages 1-4, each channel's map L2-normalised over its positions, the larger map
average-pooled to the smaller, the full MMD² including the teacher's constant term (RepDistiller
``distiller_zoo/NST.py`` with ``train_student.py``'s ``feat_s[1:-1]``; mdistiller ``distillers/NST.py``
with ``feats[1:]``: the two agree); β 50 with CE 1 (RepDistiller ``scripts/run_cifar_distill.sh``
``-b 50``; mdistiller ``engine/cfg.py`` ``NST.LOSS.FEAT_WEIGHT``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods._feature import register_feature

STAGES = (1, 2, 3, 4)


def channel_maps(f: torch.Tensor) -> torch.Tensor:
    """Each channel's map as a unit vector over the positions, (B, C, H*W)."""
    return F.normalize(f.flatten(2), dim=2)


def poly_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean over the batch and over all pairs (i, j) of k(a_i, b_j) = (a_iᵀ b_j)²."""
    return (a @ b.transpose(1, 2)).pow(2).mean()  # (B, C_a, C_b) -> ()


class NSTLoss(nn.Module):
    """Neuron selectivity transfer (Huang & Wang, 2017), polynomial kernel k(x, y) = (xᵀy)².

    Each channel i of a stage's map is one sample f_i ∈ R^{HW} (L2-normalised); the student's C_s
    and the teacher's C_t samples are compared by the squared maximum mean discrepancy

        MMD² = 1/C_t² Σ_{i,i'} k(t_i, t_i') + 1/C_s² Σ_{j,j'} k(s_j, s_j') − 2/(C_s·C_t) Σ_{i,j} k(s_j, t_i)

    averaged over the batch and summed over stages 1-4. Channel counts may differ; the larger map
    is average-pooled to the smaller size. The teacher's term does not depend on the student and
    only makes the value an MMD² (0 for identical maps), as both releases keep it.
    """

    def __init__(self, stages: tuple[int, ...] = STAGES):
        super().__init__()
        self.stages = stages

    def forward(self, s_feats: dict, t_feats: dict, **_) -> torch.Tensor:
        # MMD² is a small difference of three means near 1: bf16 products (autocast) would drown it
        with torch.autocast(s_feats["stages"][0].device.type, enabled=False):
            return self._mmd2(s_feats, t_feats)

    def _mmd2(self, s_feats: dict, t_feats: dict) -> torch.Tensor:
        total = 0.0
        for k in self.stages:
            fs, ft = s_feats["stages"][k].float(), t_feats["stages"][k].float()
            size = min(fs.shape[-1], ft.shape[-1])
            fs, ft = F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size)
            s, t = channel_maps(fs), channel_maps(ft)  # (B, C_s, HW), (B, C_t, HW)
            total = total + poly_kernel_mean(t, t) + poly_kernel_mean(s, s) - 2 * poly_kernel_mean(s, t)
        return total


register_feature(
    "nst",
    lambda cfg, student, teacher, **_: NSTLoss(),
    50.0,
    "Huang & Wang 2017 (polynomial kernel d 2, c 0, stages 1-4: RepDistiller distiller_zoo/NST.py and "
    "train_student.py, mdistiller distillers/NST.py; β 50: RepDistiller scripts/run_cifar_distill.sh)",
)
