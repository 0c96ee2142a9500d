"""Correlation congruence (Peng et al., ICCV 2019): match how the samples of a batch correlate, not where each lies.

Recipe and where each number comes from:
- the kernel: the paper's Gaussian RBF through its Taylor expansion of order P = 2 with γ = 0.4,
  no instance term (AberHu/Knowledge-Distillation-Zoo ``kd_losses/cc.py``, ``train_kd.py`` defaults
  ``--gamma 0.4 --P_order 2``);
- the embedding: a linear map of each network's pooled features to 128 dimensions, both trained with
  the student (RepDistiller ``train_student.py``: ``LinearEmbed(feat[-1], opt.feat_dim)``, ``--feat_dim``
  128, both in ``trainable_list``);
- β 100 with CE 1: the weight of the release that implements this kernel (the zoo's
  ``example_train_script.sh``); mdistiller has no CC.

RepDistiller's own ``distiller_zoo/CC.py`` is not the paper's kernel: it averages Σ_d |Δ_i,d|·|Δ_i+1,d|
over neighbouring samples of the embedding difference Δ = e_s − e_t. This file follows the paper's
equation instead, so RepDistiller's β 0.02 weighs a term of another size: the kernel's entries lie in
[0.23, 0.95] (γ 0.4, P 2), and the term measured ≈ 0.06 falling to ≈ 0.01 over three smoke-profile
epochs, i.e. β·term ≲ 1e-3 beside a CE near 1: CC at β 0.02 would train as plain CE. The zoo weighs
this same kernel term with 100 (``example_train_script.sh``, CIFAR-10 ResNets), which is used here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from methods._feature import register_feature
from registry import Param, non_negative, positive


def taylor_rbf(e: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """The batch's correlation matrix under exp(−γ‖x − y‖²) for unit rows, (B, B).

    ‖x − y‖² = 2 − 2xᵀy for unit vectors, so k(x, y) = e^{−2γ}·e^{2γ xᵀy}; the exponential's
    series is cut after ``order``: Σ_{p=0}^{P} e^{−2γ} (2γ)^p / p! · (xᵀy)^p.
    """
    cos = e @ e.t()  # (B, B)
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * cos.pow(p) for p in range(order + 1))


class CCLoss(nn.Module):
    """Correlation congruence (Peng et al., ICCV 2019), Gaussian-RBF kernel by its Taylor expansion.

    e_s = normalise(W_s·f_s + b_s), e_t = normalise(W_t·f_t + b_t): trained linear embeddings of the
    pooled features (``dim`` wide), L2-normalised as the kernel's expansion assumes;
    C = ψ(e) the (B, B) correlation matrix ``taylor_rbf``, and

        L = 1/B² ‖C_s − C_t‖²_F

    Both embeddings train with the student (the teacher's network does not), as in RepDistiller.
    """

    def __init__(self, s_dim: int, t_dim: int, dim: int = 128, gamma: float = 0.4, order: int = 2):
        super().__init__()
        self.embed_s, self.embed_t = nn.Linear(s_dim, dim), nn.Linear(t_dim, dim)
        self.gamma, self.order = gamma, order

    def forward(self, s_feats: dict, t_feats: dict, **_) -> torch.Tensor:
        e_s = F.normalize(self.embed_s(s_feats["pooled"]).float(), dim=1)  # (B, dim)
        e_t = F.normalize(self.embed_t(t_feats["pooled"].float()).float(), dim=1)  # (B, dim)
        with torch.autocast(e_s.device.type, enabled=False):  # the two matrices differ little: fp32 products
            c_s = taylor_rbf(e_s, self.gamma, self.order)  # (B, B)
            c_t = taylor_rbf(e_t, self.gamma, self.order)  # (B, B)
        return (c_s - c_t).pow(2).mean()


PARAMS = (
    Param("cc_dim", int, "CC: width of the two linear embeddings of the pooled features", check=positive),
    Param("cc_gamma", float, "CC: γ of the Gaussian kernel exp(−γ‖x − y‖²)", check=positive),
    Param("cc_order", int, "CC: order P of the kernel's Taylor expansion", check=non_negative),
)


def build_cc(cfg, student: nn.Module, teacher: nn.Module, **_) -> CCLoss:
    return CCLoss(student.embed_dim, teacher.embed_dim, cfg.cc_dim, cfg.cc_gamma, cfg.cc_order)


register_feature(
    "cc",
    build_cc,
    100.0,
    "Peng et al. 2019 (Gaussian RBF, Taylor order 2, γ 0.4, β 100: AberHu/Knowledge-Distillation-Zoo "
    "kd_losses/cc.py, train_kd.py, example_train_script.sh; 128-d trained linear embeddings of both pooled "
    "features: RepDistiller train_student.py; RepDistiller's β 0.02 is for its own, different CC.py term)",
    params=PARAMS,
    benchmark="",
    cc_dim=128,
    cc_gamma=0.4,
    cc_order=2,
)
