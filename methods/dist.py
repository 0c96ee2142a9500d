"""DIST (Huang et al., NeurIPS 2022): match the teacher's prediction relations, not its probabilities."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.kd import LOGIT_STAND, standardized, upcast
from registry import CE_WEIGHT, Param, T, non_negative, register_method


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``, (N,): the cosine of the
    mean-centred rows; ``eps`` in the denominator makes a constant row correlate 0."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(
    logits_s: torch.Tensor, logits_t: torch.Tensor, T: float, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST's two relation losses on y = softmax(z/T), each with the T² factor of the release.

    inter = T²·(1 − (1/B) Σ_b ρ(y_s[b, :], y_t[b, :])): per sample, across the classes;
    intra = T²·(1 − (1/K) Σ_k ρ(y_s[:, k], y_t[:, k])): per class, across the batch.
    ρ is Pearson's correlation, so each prediction need only be matched up to a shift and a
    positive scale: a "relaxed" match that suits a much stronger teacher.
    """
    y_s = F.softmax(upcast(logits_s) / T, dim=1)  # (B, K)
    y_t = F.softmax(upcast(logits_t) / T, dim=1)  # (B, K)
    inter = 1 - pearson_rows(y_s, y_t, eps).mean()
    intra = 1 - pearson_rows(y_s.t(), y_t.t(), eps).mean()
    return inter * T * T, intra * T * T


class DISTLoss(nn.Module):
    """Huang, You, Wang, Qian & Xu, NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher".

    L = w_ce · CE(z_s, y) + β · inter + γ · intra (``dist_terms``: Pearson correlations of the
    softened predictions, per sample across classes and per class across the batch, T²-scaled).
    Returns ``{"ce", "inter", "intra"}``, already weighted; their sum is L.

    Released CIFAR-100 recipe (hunto/image_classification_sota, the DIST_KD release's
    ``classification`` submodule: ``configs/strategies/distill/dist_cifar.yaml`` with ``kd: dist_t4``,
    ``ori_loss_weight 1``, ``kd_loss_weight 2``; ``lib/models/losses/kd_loss.py`` builds
    ``DIST(beta=1, gamma=1, tau=4)`` for it): T = 4, w_ce = 1, and the KD weight 2 times β = γ = 1,
    i.e. β = γ = 2 here. (ImageNet: ``resnet_dist.yaml``, ``kd: dist``, τ = 1, same weights.)

    ``logit_stand``: the relations on z-scored logits (Sun et al. 2024), CE on the raw ones. Not in
    either release: Pearson's ρ already ignores the scale and shift of the *probabilities*, but
    not those of the logits, so the switch still changes the softened predictions it compares.
    """

    def __init__(
        self,
        T: float = 4.0,
        ce_weight: float = 1.0,
        inter_weight: float = 2.0,
        intra_weight: float = 2.0,
        logit_stand: bool = False,
    ):
        super().__init__()
        if T <= 0 or min(ce_weight, inter_weight, intra_weight) < 0:
            raise ValueError(
                f"need T > 0 and weights >= 0, got T={T}, ce_weight={ce_weight}, inter_weight={inter_weight}, "
                f"intra_weight={intra_weight}"
            )
        self.T, self.ce_weight, self.inter_weight, self.intra_weight = T, ce_weight, inter_weight, intra_weight
        self.logit_stand = logit_stand

    def forward(self, logits_s, logits_t, target, **_) -> dict[str, torch.Tensor]:
        inter, intra = dist_terms(*standardized(logits_s, logits_t, self.logit_stand), self.T)
        return {
            "ce": self.ce_weight * F.cross_entropy(logits_s, target),
            "inter": self.inter_weight * inter,
            "intra": self.intra_weight * intra,
        }


PARAMS = (
    T,
    CE_WEIGHT,
    Param(
        "inter_weight",
        float,
        "DIST: β, weight of the inter-class relation (per-sample Pearson across classes)",
        check=non_negative,
        loss_weight=True,
    ),
    Param(
        "intra_weight",
        float,
        "DIST: γ, weight of the intra-class relation (per-class Pearson across the batch)",
        check=non_negative,
        loss_weight=True,
    ),
    LOGIT_STAND,
)


@register_method(
    "dist",
    source="Huang et al. 2022; hunto/image_classification_sota (the DIST_KD release's classification code) "
    "configs/strategies/distill/dist_cifar.yaml (kd dist_t4: T 4; ori_loss_weight 1; kd_loss_weight 2) on "
    "lib/models/losses/kd_loss.py (DIST beta 1, gamma 1): CE 1, β = γ = 2·1",
    params=PARAMS,
    T=4.0,
    ce_weight=1.0,
    inter_weight=2.0,
    intra_weight=2.0,
)
def build(cfg, student: nn.Module, teacher: nn.Module, **_) -> nn.Module:
    return DISTLoss(cfg.T, cfg.ce_weight, cfg.inter_weight, cfg.intra_weight, cfg.logit_stand)
