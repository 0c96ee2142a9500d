"""Multi-level logit distillation (Jin, Wang & Lin, CVPR 2023): instance, batch and class alignment."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.kd import LOGIT_STAND, standardized, upcast
from registry import CE_WEIGHT, KD_WEIGHT, Param, T, register_method

# The temperatures the release adds to the base one (``KD_ours.py`` / ``MLKD.py``: 3, 5, 2, 6)
EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)


def per_sample_kd(logits_s: torch.Tensor, logits_t: torch.Tensor, T: float) -> torch.Tensor:
    """T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) for each sample, (B,)."""
    log_p_s = F.log_softmax(upcast(logits_s) / T, dim=1)
    log_p_t = F.log_softmax(upcast(logits_t) / T, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1) * T * T


def _gram_gap(logits_s: torch.Tensor, logits_t: torch.Tensor, T: float, over_classes: bool) -> torch.Tensor:
    """‖G_t − G_s‖²_F of the Gram matrices of P = softmax(z/T): P Pᵀ (B×B), or Pᵀ P (K×K) with
    ``over_classes``; in fp32 even under autocast (which would run the products in bf16)."""
    with torch.autocast(logits_s.device.type, enabled=False):
        p_s = F.softmax(upcast(logits_s) / T, dim=1)  # (B, K)
        p_t = F.softmax(upcast(logits_t) / T, dim=1)
        if over_classes:
            p_s, p_t = p_s.t(), p_t.t()
        return ((p_t @ p_t.t() - p_s @ p_s.t()) ** 2).sum()


def batch_alignment(logits_s: torch.Tensor, logits_t: torch.Tensor, T: float) -> torch.Tensor:
    """‖G_t − G_s‖²_F / B, G = P Pᵀ (B×B): how alike the samples of the batch are, by prediction."""
    return _gram_gap(logits_s, logits_t, T, over_classes=False) / logits_s.shape[0]


def class_alignment(logits_s: torch.Tensor, logits_t: torch.Tensor, T: float) -> torch.Tensor:
    """‖M_t − M_s‖²_F / K, M = Pᵀ P (K×K): how the classes co-occur in the batch's predictions."""
    return _gram_gap(logits_s, logits_t, T, over_classes=True) / logits_s.shape[1]


@torch.no_grad()
def confidence_fractions(logits_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's confidence masks, as the fractions they amount to: (samples whose teacher
    max-probability is at most its batch median, classes whose summed teacher probability is at
    most their median), each a scalar in (0, 1]. The median interpolates linearly between the
    middle values (NumPy's ``percentile(·, 50)``, which the release calls)."""
    p_t = F.softmax(upcast(logits_t), dim=1)  # (B, K), T = 1
    confidence = p_t.max(dim=1).values  # (B,)
    class_mass = p_t.sum(dim=0)  # (K,)
    sample = (confidence <= torch.quantile(confidence, 0.5)).float().mean()
    cls = (class_mass <= torch.quantile(class_mass, 0.5)).float().mean()
    return sample, cls


class MLKDLoss(nn.Module):
    """Jin, Wang & Lin, CVPR 2023, "Multi-level Logit Distillation".

    Predictions are augmented with five temperatures T_j ∈ (T, 3, 5, 2, 6) and aligned at three
    levels, each summed over the T_j, on the usual crop-and-flip view w:

        instance  ρ_b · T_j² · KL(p_t ‖ p_s), batch mean      (``per_sample_kd``)
        batch     ρ_b · ‖P_t P_tᵀ − P_s P_sᵀ‖²_F / B           (``batch_alignment``, B×B)
        class     ρ_c · ‖P_tᵀ P_t − P_sᵀ P_s‖²_F / K           (``class_alignment``, K×K)

    With the release's second, strongly augmented view s of the same images (``strong_s``,
    ``strong_t``: RandAugment and Cutout, ``randaugment.py``), CE is taken on both views and an
    unmasked instance sum is added:

        strong    Σ_{T_j ∈ (T, 3, 5)} T_j² · KL on s  +  Σ_{T_j ∈ (2, 6)} T_j² · KL on w

    The release's (``KD_ours.py``) strong-view sum takes its T = 2 and 6 terms from the weak view
    (lines copied from the weak sum); its published numbers come from that loss, so it is kept. The
    release computes strong-view batch and class terms too but never adds them to the loss.

    L = w_ce · (CE_w [+ CE_s]) + w_kd · (instance + batch + class [+ strong]). Returns ``{"ce",
    "instance", "batch", "class"}`` (and ``"strong"`` with the second view), already weighted.

    ρ_b and ρ_c are the release's confidence masking (``confidence_fractions``): it masks the samples
    (classes) whose teacher confidence is above the batch median, but multiplies the mask by a loss
    already averaged over the batch (the per-sample ``reduce=False`` is commented out), so what
    reaches the gradient is the *fraction* of samples (classes) kept, ≈ ½, not a per-sample mask.
    This loss computes exactly that.

    The recipe trains on both views, as the release; ``mlkd_strong_view=False``
    (``--no-mlkd-strong-view``) keeps the first view's part only, which the tables ran before
    (``benchmarks/mlkd_views.py`` compares the two).

    ``logit_stand`` (Sun et al. 2024, whose release ``mdistiller/distillers/MLKD.py`` has it): the
    instance terms (both views') on z-scored logits; the batch and class terms and the confidence
    masks stay on the raw logits, as in that release. Their runs pair it with T = 2 and w_kd 9 (6 for
    VGG13→VGG8, log ``mlkd,vgg13,vgg8,2,6``).

    Recipe: T = 4, w_ce = 0.1, w_kd = 0.9 (the MLKD release's ``mdistiller/engine/cfg.py``, ``CFG.KD``,
    read by ``KD_ours.py``); its VGG13→VGG8 config trains 240 epochs at LR 0.025 (480 before its
    last commit; LS-KD's ``configs/cifar100/mlkd/vgg13_vgg8.yaml``: 480 at 0.01).
    """

    def __init__(self, T: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9, logit_stand: bool = False):
        super().__init__()
        if T <= 0 or ce_weight < 0 or kd_weight < 0:
            raise ValueError(f"need T > 0 and weights >= 0, got T={T}, ce_weight={ce_weight}, kd_weight={kd_weight}")
        self.T, self.ce_weight, self.kd_weight, self.logit_stand = T, ce_weight, kd_weight, logit_stand
        self.temperatures = (T, *EXTRA_TEMPERATURES)

    def forward(self, logits_s, logits_t, target, strong_s=None, strong_t=None, **_) -> dict[str, torch.Tensor]:
        rho_b, rho_c = confidence_fractions(logits_t)
        zs, zt = standardized(logits_s, logits_t, self.logit_stand)
        instance = sum(per_sample_kd(zs, zt, T).mean() for T in self.temperatures)
        batch = sum(batch_alignment(logits_s, logits_t, T) for T in self.temperatures)
        cls = sum(class_alignment(logits_s, logits_t, T) for T in self.temperatures)
        w = self.kd_weight
        terms = {
            "ce": self.ce_weight * F.cross_entropy(logits_s, target),
            "instance": w * rho_b * instance,
            "batch": w * rho_b * batch,
            "class": w * rho_c * cls,
        }
        if strong_s is not None:
            terms["ce"] = terms["ce"] + self.ce_weight * F.cross_entropy(strong_s, target)
            terms["strong"] = w * self.strong_instance(strong_s, strong_t, zs, zt)
        return terms

    def strong_instance(self, strong_s, strong_t, zs_weak, zt_weak) -> torch.Tensor:
        """The release's strong-view instance sum (see the class doc): T, 3, 5 on the strong view,
        2 and 6 on the weak one, none masked."""
        ss, st = standardized(strong_s, strong_t, self.logit_stand)
        on_strong = sum(per_sample_kd(ss, st, T).mean() for T in (self.T, *EXTRA_TEMPERATURES[:2]))
        return on_strong + sum(per_sample_kd(zs_weak, zt_weak, T).mean() for T in EXTRA_TEMPERATURES[2:])


PARAMS = (
    T,
    CE_WEIGHT,
    KD_WEIGHT,
    LOGIT_STAND,
    Param(
        "mlkd_strong_view",
        bool,
        "MLKD: train on the release's second view too (RandAugment and Cutout): CE and instance terms on it",
        default=False,
    ),
)


@register_method(
    "mlkd",
    source="Jin et al. 2023; MLKD release (Jin-Ying/Multi-Level-Logit-Distillation) mdistiller/engine/cfg.py "
    "(CFG.KD: T 4, CE 0.1, KD 0.9) read by mdistiller/distillers/KD_ours.py (extra temperatures 3, 5, 2, 6; "
    "median confidence masks); mdistiller/dataset/cifar100.py (the strong view, with --mlkd-strong-view)",
    params=PARAMS,
    second_view=lambda cfg: cfg.mlkd_strong_view,
    T=4.0,
    ce_weight=0.1,
    kd_weight=0.9,
    mlkd_strong_view=True,
)
def build(cfg, student: nn.Module, teacher: nn.Module, **_) -> nn.Module:
    return MLKDLoss(cfg.T, cfg.ce_weight, cfg.kd_weight, cfg.logit_stand)
