"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018): match the embeddings' similarity distributions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods._feature import register_feature


def cosine_kernel(f: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Conditional probabilities P[i, j] ∝ (cos(f_i, f_j) + 1) / 2 within a batch, (B, B)."""
    f = F.normalize(f.float(), dim=1, eps=eps)
    k = (f @ f.t() + 1) / 2
    return k / k.sum(dim=1, keepdim=True)


class PKTLoss(nn.Module):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018).

    L = mean_{i,j} P_t[i,j] · log(P_t[i,j] / P_s[i,j]), with P the cosine-similarity kernel of
    the pooled embeddings normalised per row (the mean over all B² entries, as the benchmark).
    """

    def __init__(self, eps: float = 1e-7):
        super().__init__()
        self.eps = eps

    def forward(self, s_feats: dict, t_feats: dict, **_) -> torch.Tensor:
        p_s = cosine_kernel(s_feats["pooled"], self.eps)  # (B, B)
        p_t = cosine_kernel(t_feats["pooled"], self.eps)  # (B, B)
        return (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()


register_feature("pkt", lambda cfg, student, teacher, **_: PKTLoss(), 30000.0, "Passalis & Tefas 2018")
