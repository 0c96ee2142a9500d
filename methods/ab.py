"""Activation boundaries (Heo et al., AAAI 2019): teach the student which neurons fire, with a margin.

Registered as ``ab`` and ``ab+kd``, with the release's init stage (``methods/_init_stage.py``): the
student's stages and the connectors are first trained on the AB loss alone, then the student on CE
(β = 0: the release's main stage, ``helper/loops.py``, sets the AB term to 0 whatever ``-b`` says).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods._init_stage import register_with_init
from methods.fitnet import ConvReg, stage_shape
from registry import Param, positive


def connector(c_s: int, c_t: int, h_s: int, h_t: int) -> nn.Module:
    """Student pre-activation -> teacher's shape: nothing where the shapes agree, else FitNets'
    regressor without its ReLU (conv + BN: the connector's output is a pre-activation too)."""
    if (c_s, h_s) == (c_t, h_t):
        return nn.Identity()
    return nn.Sequential(*list(ConvReg(c_s, c_t, h_s, h_t).body)[:2])


class ABLoss(nn.Module):
    """Activation-boundary transfer (Heo et al., AAAI 2019), the paper's alternative (hinge) loss.

    For the pre-activations of stages 1-4, r = connector(S) (student) and t (teacher), margin m:
        ℓ_k = (1/B) Σ_{b,c,h,w} ( 1[t > 0] · max(0, m − r)² + 1[t ≤ 0] · max(0, m + r)² ),
    so a student neuron is pushed at least m past zero on the side where the teacher's fires or
    not. L = 3/1000 · Σ_k 2^(k − K) ℓ_k over the K = 4 stages k = 1..K (deeper stages weigh more):
    margin 1, weights and the 3/1000 scale of RepDistiller's ``distiller_zoo/AB.py``. Its init stage
    trains on this same loss.
    """

    SCALE = 3 / 1000

    def __init__(self, connectors: nn.ModuleList, stages: tuple[int, ...] = (1, 2, 3, 4), margin: float = 1.0):
        super().__init__()
        self.connectors, self.stages, self.margin = connectors, stages, margin

    @classmethod
    def between(cls, student: nn.Module, teacher: nn.Module, margin: float = 1.0, stages=(1, 2, 3, 4)):
        links = nn.ModuleList()
        for k in stages:
            (c_s, h_s), (c_t, h_t) = stage_shape(student, k), stage_shape(teacher, k)
            links.append(connector(c_s, c_t, h_s, h_t))
        return cls(links, stages, margin)

    def forward(self, s_feats: dict, t_feats: dict, **_) -> torch.Tensor:
        total, m = 0.0, self.margin
        depth = len(self.stages)
        for i, (k, link) in enumerate(zip(self.stages, self.connectors, strict=True)):
            r = link(s_feats["preact"][k]).float()  # (B, C_t, H_t, W_t)
            t = t_feats["preact"][k].float()  # (B, C_t, H_t, W_t)
            hinge = torch.where(t > 0, F.relu(m - r), F.relu(m + r))  # (B, C_t, H_t, W_t)
            total = total + 2.0 ** (i + 1 - depth) * hinge.pow(2).sum() / r.shape[0]
        return self.SCALE * total

    def init_loss(self, s_feats: dict, t_feats: dict) -> torch.Tensor:
        return self(s_feats, t_feats)


MARGIN = Param("ab_margin", float, "AB: margin m of the hinge on the student's pre-activations", check=positive)


def build_ab(cfg, student: nn.Module, teacher: nn.Module, **_) -> ABLoss:
    return ABLoss.between(student, teacher, cfg.ab_margin)


register_with_init(
    "ab",
    build_ab,
    0.0,
    "Heo et al. 2019; RepDistiller distiller_zoo/AB.py (stages 1-4 pre-activations, margin 1, weights "
    "2^(k-4), scale 3/1000) and models/util.py Connector (conv + BN where the shapes differ); main "
    "stage β 0: helper/loops.py sets loss_kd = 0 for abound, so the -b 1 of scripts/run_cifar_distill.sh "
    "multiplies nothing",
    params=(MARGIN,),
    ab_margin=1.0,
)
