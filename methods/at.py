"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017): match where the networks' activations concentrate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods._feature import register_feature


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of a feature map: the per-sample L2-normalised mean_c |F|^p, (B, H*W)."""
    return F.normalize(f.float().abs().pow(p).mean(dim=1).flatten(1), dim=1)


class ATLoss(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017).

    L = Σ_k mean_{b, hw} (a(F_s^(k)) - a(F_t^(k)))², a(F) = normalise(mean_c |F|^p), p = 2, over
    stages 1-4 by default; the larger map is average-pooled when the two sizes differ.
    """

    def __init__(self, stages: tuple[int, ...] = (1, 2, 3, 4), p: float = 2.0):
        super().__init__()
        self.stages, self.p = stages, p

    def forward(self, s_feats: dict, t_feats: dict, **_) -> torch.Tensor:
        total = 0.0
        for k in self.stages:
            fs, ft = s_feats["stages"][k], t_feats["stages"][k]
            size = min(fs.shape[-1], ft.shape[-1])
            fs, ft = F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size)
            total = total + (attention_map(fs, self.p) - attention_map(ft, self.p)).pow(2).mean()
        return total


register_feature("at", lambda cfg, student, teacher, **_: ATLoss(), 1000.0, "Zagoruyko & Komodakis 2017")
