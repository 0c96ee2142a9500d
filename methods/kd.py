"""Knowledge distillation (Hinton, Vinyals & Dean 2015): the student matches the teacher's softened outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from analysis import standardize
from registry import KD_PARAMS, Param, register_method

# The logit-standardisation switch every logit method reads (declared once: the registry requires
# a parameter to be declared alike by every method that reads it).
LOGIT_STAND = Param(
    "logit_stand",
    bool,
    "z-score student and teacher logits per sample before the distillation terms (Sun et al. 2024); "
    "CE stays on the raw logits",
    default=False,
)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits (autocast) to fp32: softmax at high T needs the mantissa; fp64 stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, T: float) -> torch.Tensor:
    """T² · (1/B) Σ_b KL(softmax(z_t/T) ‖ softmax(z_s/T)): Hinton et al. 2015's soft-target term.

    The T² keeps the gradient scale independent of T (soft-target gradients shrink as 1/T²).
    """
    log_p_s = F.log_softmax(upcast(logits_s) / T, dim=1)  # (B, K)
    log_p_t = F.log_softmax(upcast(logits_t) / T, dim=1)  # (B, K)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T * T


def standardized(logits_s: torch.Tensor, logits_t: torch.Tensor, on: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logits z-scored per sample over classes (``analysis.standardize``) when ``on``, else as given.

    Sun et al. 2024: the student then matches the teacher's logit relations, not their scale or
    shift, as if each sample had its own temperature T·σ(z)."""
    return (standardize(logits_s), standardize(logits_t)) if on else (logits_s, logits_t)


class KDLoss(nn.Module):
    """Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".

    L = w_ce · CE(z_s, y) + w_kd · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), batch mean.
    Returns the weighted terms ``{"ce": w_ce·CE, "kd": w_kd·T²·KL}``; their sum is L. The
    weights are free (mdistiller's convention), not tied to sum to 1. The CIFAR-100 benchmark
    recipe is w_ce = 0.1, w_kd = 0.9, T = 4 (RepDistiller, mdistiller).

    ``logit_stand``: the soft-target term on z-scored logits (Sun et al. 2024; ``kd_ls`` is KD with
    it on), cross-entropy on the raw ones.
    """

    def __init__(self, T: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9, logit_stand: bool = False):
        super().__init__()
        if T <= 0 or ce_weight < 0 or kd_weight < 0:
            raise ValueError(f"need T > 0 and weights >= 0, got T={T}, ce_weight={ce_weight}, kd_weight={kd_weight}")
        self.T, self.ce_weight, self.kd_weight, self.logit_stand = T, ce_weight, kd_weight, logit_stand

    def match(self, logits_s: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
        """The unweighted soft-target term, T²·KL (on z-scored logits with ``logit_stand``)."""
        return kd_loss(*standardized(logits_s, logits_t, self.logit_stand), self.T)

    def forward(self, logits_s, logits_t, target, **_) -> dict[str, torch.Tensor]:
        return {
            "ce": self.ce_weight * F.cross_entropy(logits_s, target),
            "kd": self.kd_weight * self.match(logits_s, logits_t),
        }


KD_RECIPE = dict(T=4.0, ce_weight=0.1, kd_weight=0.9)
KD_SOURCE = "Hinton et al. 2015; CIFAR-100 recipe of RepDistiller (-r 0.1 -a 0.9, kd_T 4) and mdistiller (KD.yaml)"


@register_method("kd", source=KD_SOURCE, params=(*KD_PARAMS, LOGIT_STAND), **KD_RECIPE)
def build(cfg, student: nn.Module, teacher: nn.Module, **_) -> nn.Module:
    return KDLoss(cfg.T, cfg.ce_weight, cfg.kd_weight, cfg.logit_stand)
