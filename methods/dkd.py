"""Decoupled knowledge distillation (Zhao et al., CVPR 2022): KD split into target and non-target terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.kd import LOGIT_STAND, kd_loss, standardized, upcast
from registry import CE_WEIGHT, WARMUP, Param, T, non_negative, register_method, warmup_check


def dkd_terms(
    logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, T: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample TCKD and NCKD (Zhao et al. 2022), both with the T² factor, each (B,).

    TCKD = T²·KL(b_t ‖ b_s), b = (p_target, 1 − p_target) of softmax(z/T);
    NCKD = T²·KL(p̂_t ‖ p̂_s), p̂ = softmax(z/T) over the non-target classes only.
    KD = TCKD + (1 − p_t,target)·NCKD for every sample: the classical loss couples the two.
    """
    zs, zt = upcast(logits_s) / T, upcast(logits_t) / T  # (B, K)
    is_target = F.one_hot(target, zs.shape[1]).bool()  # (B, K)

    def parts(z):
        log_all = torch.logsumexp(z, dim=1)  # (B,)
        non_target = z.masked_fill(is_target, float("-inf"))  # (B, K)
        log_b = torch.stack([z[is_target] - log_all, torch.logsumexp(non_target, 1) - log_all], 1)  # (B, 2)
        return log_b, F.log_softmax(non_target, dim=1)  # log p̂: -inf at the target

    log_b_s, log_hat_s = parts(zs)
    log_b_t, log_hat_t = parts(zt)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(1)
    nckd = (log_hat_t.exp() * (log_hat_t - log_hat_s)).masked_fill(is_target, 0.0).sum(1)
    return tckd * T * T, nckd * T * T


@torch.no_grad()
def kd_decomposition(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, T: float = 4.0) -> dict:
    """Means over samples of Hinton's T²·KL and its DKD parts: KD = TCKD + (1 − p_t,target)·NCKD."""
    tckd, nckd = dkd_terms(logits_s, logits_t, target, T)  # (N,), (N,)
    weight = 1 - (upcast(logits_t) / T).softmax(1).gather(1, target[:, None]).squeeze(1)  # (N,)
    return {
        "kd": kd_loss(logits_s, logits_t, T).item(),
        "tckd": tckd.mean().item(),
        "nckd": nckd.mean().item(),
        "teacher_1-p_target": weight.mean().item(),
        "weighted_nckd": (weight * nckd).mean().item(),
    }


class DKDLoss(nn.Module):
    """Decoupled KD (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation").

    L = w_ce · CE + min((epoch + 1) / warm-up, 1) · (α · TCKD + β · NCKD), batch means of
    ``dkd_terms``. Classical KD weighs NCKD by the teacher's 1 − p_target, so the better the
    teacher is on a sample the less its dark knowledge counts; DKD weighs it by a free β.
    Released recipe (mdistiller ``configs/cifar100/dkd/vgg13_vgg8.yaml`` on ``engine/cfg.py``):
    w_ce = 1, α = 1, β = 6 for VGG13→VGG8 (8 elsewhere), T = 4, 20 warm-up epochs of 240.

    ``logit_stand``: TCKD and NCKD on z-scored logits, CE on the raw ones (Sun et al. 2024's
    ``--logit-stand`` for DKD, ``mdistiller/distillers/DKD.py`` of their release). Their runs pair it
    with T = 2 and α, β multiplied by a KD weight (VGG13→VGG8 log ``dkd,vgg13,vgg8,2,15,2.0``:
    T 2, α = 15, β = 2·15 = 30), which is not this method's recipe: pass them.
    """

    def __init__(
        self,
        T: float = 4.0,
        ce_weight: float = 1.0,
        alpha: float = 1.0,
        beta: float = 6.0,
        warmup=20,
        logit_stand: bool = False,
    ):
        super().__init__()
        self.T, self.ce_weight, self.alpha, self.beta, self.warmup = T, ce_weight, alpha, beta, warmup
        self.logit_stand = logit_stand
        self.ramp = 1.0 if not warmup else 1 / warmup

    def set_epoch(self, epoch: int) -> None:
        self.ramp = 1.0 if not self.warmup else min((epoch + 1) / self.warmup, 1.0)

    def forward(self, logits_s, logits_t, target, **_) -> dict[str, torch.Tensor]:
        tckd, nckd = dkd_terms(*standardized(logits_s, logits_t, self.logit_stand), target, self.T)
        return {
            "ce": self.ce_weight * F.cross_entropy(logits_s, target),
            "tckd": self.ramp * self.alpha * tckd.mean(),
            "nckd": self.ramp * self.beta * nckd.mean(),
        }


check_dkd = warmup_check("DKD")


PARAMS = (
    T,
    CE_WEIGHT,
    Param("tckd_weight", float, "DKD: α, weight of the target-class term", check=non_negative, loss_weight=True),
    Param("nckd_weight", float, "DKD: β, weight of the non-target-class term", check=non_negative, loss_weight=True),
    WARMUP,
    LOGIT_STAND,
)


@register_method(
    "dkd",
    source="Zhao et al. 2022; mdistiller configs/cifar100/dkd/vgg13_vgg8.yaml (BETA 6) on engine/cfg.py "
    "(CE 1, ALPHA 1, T 4, WARMUP 20 of 240 epochs)",
    params=PARAMS,
    check=check_dkd,
    T=4.0,
    ce_weight=1.0,
    tckd_weight=1.0,
    nckd_weight=6.0,
    warmup=20.0,
)
def build(cfg, student: nn.Module, teacher: nn.Module, **_) -> nn.Module:
    return DKDLoss(cfg.T, cfg.ce_weight, cfg.tckd_weight, cfg.nckd_weight, cfg.warmup, cfg.logit_stand)
