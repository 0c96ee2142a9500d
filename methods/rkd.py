"""Relational KD (Park et al., CVPR 2019): match distances and angles between a batch's embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods._feature import register_feature


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows of a batch, (B, B), zero on the diagonal."""
    sq = e.pow(2).sum(1)  # (B,)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps)  # (B, B)
    return d2.sqrt() * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """cos ∠(e_i, e_j, e_k) for every triplet: <(e_i − e_j)/‖·‖, (e_k − e_j)/‖·‖>, flattened (B³,), 0 where
    e_i or e_k is e_j (a zero vector normalised).

    From the Gram matrix, <e_i − e_j, e_k − e_j> = G_ik − G_ij − G_jk + G_jj and ‖e_i − e_j‖² = G_ii + G_jj −
    2G_ij: O(B²D + B³), where normalising every difference vector costs O(B³D), which with MobileNetV2's
    1280-wide embedding made RKD about seven times the rest of its cohort. Angles ignore translation, so the
    batch mean is removed first: the Gram entries then have the size of the differences, not of the
    embeddings. A squared distance within rounding of 0 (256 ulp of ‖e_i‖² + ‖e_j‖², both centred: a distance
    under about 0.8% of their length in float32) is a repeated embedding, whose angles are 0.
    """
    c = e - e.mean(0)  # (B, D)
    g = c @ c.t()  # (B, B)
    sq = g.diagonal()  # (B,)
    dot = g[None, :, :] - g[:, :, None] - g[:, None, :] + sq[:, None, None]  # (B, B, B): [j, i, k]
    d2 = sq[:, None] + sq[None, :] - 2 * g  # (B, B)
    tied = d2 <= 256 * torch.finfo(e.dtype).eps * (sq[:, None] + sq[None, :])  # (B, B), the diagonal too
    # rsqrt of a tied entry's d2 (0 or below) would send NaN back through the discarded branch
    inv = torch.where(tied, 0.0, torch.where(tied, 1.0, d2).rsqrt())  # (B, B): 1/‖e_i − e_j‖
    return (dot * inv[:, :, None] * inv[:, None, :]).flatten()


def triplet_angles_by_differences(e: torch.Tensor) -> torch.Tensor:
    """``triplet_angles`` as the paper writes it, every difference vector normalised: O(B³D) time and a
    (B, B, D) tensor. The reference of its test and its speed benchmark (``benchmarks/bench.py --only
    losses``); its gradient at a repeated embedding is 1/eps (``F.normalize`` of a zero vector)."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # (B, B, D): [j, i] = e_i − e_j, unit
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()  # (B³,): [j, i, k]


class RKDLoss(nn.Module):
    """Relational KD (Park et al., CVPR 2019): match the *relations* between a batch's embeddings.

    L = w_d · Σ smooth_l1(ψ_D(s_i, s_j), ψ_D(t_i, t_j)) / B² + w_a · Σ smooth_l1(ψ_A(s_i, s_j, s_k), ψ_A(t…)) / B³,
    ψ_D = ‖e_i − e_j‖ / μ with μ the mean distance over pairs i ≠ j of the batch, ψ_A the cosine of the
    angle at e_j (``triplet_angles``), on the pooled embeddings. Released weights (mdistiller
    ``engine/cfg.py``; RepDistiller): w_d = 25, w_a = 50, and the term enters with β = 1, CE 1.
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__()
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    @staticmethod
    def _normalised_distances(e: torch.Tensor) -> torch.Tensor:
        d = pairwise_distances(e)  # (B, B)
        return d / d[d > 0].mean()

    def forward(self, s_feats: dict, t_feats: dict, **_) -> torch.Tensor:
        s, t = s_feats["pooled"].float(), t_feats["pooled"].float()  # (B, D_s), (B, D_t)
        distance = F.smooth_l1_loss(self._normalised_distances(s), self._normalised_distances(t))
        angle = F.smooth_l1_loss(triplet_angles(s), triplet_angles(t))
        return self.distance_weight * distance + self.angle_weight * angle


register_feature("rkd", lambda cfg, student, teacher, **_: RKDLoss(), 1.0, "Park et al. 2019 (distance 25, angle 50)")
