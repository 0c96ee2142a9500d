"""Similarity-preserving KD (Tung & Mori, ICCV 2019): match which images of a batch look alike."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods._feature import register_feature


def batch_similarity(f: torch.Tensor) -> torch.Tensor:
    """Row-normalised Gram matrix of a batch's flattened features, (B, B)."""
    flat = f.float().flatten(1)  # (B, C*H*W)
    return F.normalize(flat @ flat.t(), dim=1)


class SPLoss(nn.Module):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019).

    L = ‖G_s - G_t‖²_F / B², G = row-normalised F Fᵀ over the batch, on the last stage's output:
    the student must find the same images alike that the teacher does, whatever its width.
    """

    def __init__(self, stage: int = -1):
        super().__init__()
        self.stage = stage

    def forward(self, s_feats: dict, t_feats: dict, **_) -> torch.Tensor:
        g_s = batch_similarity(s_feats["stages"][self.stage])  # (B, B)
        g_t = batch_similarity(t_feats["stages"][self.stage])  # (B, B)
        return (g_s - g_t).pow(2).sum() / g_s.shape[0] ** 2


register_feature("sp", lambda cfg, student, teacher, **_: SPLoss(), 3000.0, "Tung & Mori 2019")
