"""What every feature method shares: the loss around its feature term, and its two registrations.

A feature method ``m`` is registered twice, with the published β of the CIFAR-100 benchmark:
``m`` (w_ce·CE + β·feature term) and ``m+kd`` (w_ce·CE + w_kd·T²·KL + β·feature term, RepDistiller's
way of adding KD to any method). Its file gives the feature term and calls ``register_feature``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.kd import KDLoss
from registry import CE_WEIGHT, FEAT_WEIGHT, KD_WEIGHT, Param, T, register_method


class FeatureKD(nn.Module):
    """w_ce·CE (or Hinton's KD loss, when ``kd`` is given, with its own weights) plus β times a feature term.

    Returns the weighted terms, e.g. ``{"ce": w_ce·CE, "at": β·L_AT}`` or
    ``{"ce": w_ce·CE, "kd": w_kd·T²·KL, "fitnet": β·L_hint}``.
    """

    def __init__(self, name: str, feature: nn.Module, beta: float, kd: KDLoss | None = None, ce_weight: float = 1.0):
        super().__init__()
        self.name, self.feature, self.beta, self.kd, self.ce_weight = name, feature, beta, kd, ce_weight

    def set_epoch(self, epoch: int) -> None:
        """The loop's epoch, for a feature term that changes with it (ReviewKD's warm-up)."""
        if hasattr(self.feature, "set_epoch"):
            self.feature.set_epoch(epoch)

    def forward(self, logits_s, logits_t, target, s_feats=None, t_feats=None, **extras) -> dict[str, torch.Tensor]:
        if self.kd is not None:
            terms = self.kd(logits_s, logits_t, target)
        else:
            terms = {"ce": self.ce_weight * F.cross_entropy(logits_s, target)}
        terms[self.name] = self.beta * self.feature(s_feats, t_feats, **extras)
        return terms


BENCHMARK = "β of the CIFAR-100 benchmark of Tian et al. 2020 (RepDistiller scripts, -r 1 -a 0 -b β; mdistiller cfg.py)"
# `+kd`: RepDistiller's way of adding KD to any method (README: "-a 1 -b β", -r defaulting to 1),
# i.e. CE 1 + KD 1 (T = 4) + β·feature term, as in their CRD+KD row.
WITH_KD = "; + KD as RepDistiller combines it (-r 1 -a 1 -b β, kd_T 4)"


def register_feature(
    name: str,
    feature,
    beta: float,
    source: str,
    params: tuple[Param, ...] = (),
    needs_index: bool = False,
    benchmark: str = BENCHMARK,
    check=None,
    **recipe,
) -> None:
    """Register ``name`` and ``name+kd`` for the feature term ``feature(cfg, student, teacher, **context)``
    (an ``nn.Module`` called as ``term(s_feats, t_feats, **batch_extras)``) with the published ``beta``;
    ``params`` and ``recipe``: the term's own parameters and their published values; ``benchmark``:
    where β comes from (RepDistiller's CIFAR-100 benchmark unless said); ``check(cfg)``: the method's
    own check of a resolved config."""
    source = f"{source}; {benchmark}" if benchmark else source
    needs = dict(needs_features=True, needs_index=needs_index, check=check)

    def build(cfg, student: nn.Module, teacher: nn.Module, with_kd: bool = False, **context) -> FeatureKD:
        kd = KDLoss(cfg.T, cfg.ce_weight, cfg.kd_weight) if with_kd else None
        return FeatureKD(name, feature(cfg, student, teacher, **context), cfg.feat_weight, kd, ce_weight=cfg.ce_weight)

    alone = (CE_WEIGHT, FEAT_WEIGHT, *params)
    register_method(name, source=source, params=alone, ce_weight=1.0, feat_weight=beta, **needs, **recipe)(build)
    register_method(
        f"{name}+kd",
        source=source + WITH_KD,
        params=(*alone, T, KD_WEIGHT),
        T=4.0,
        ce_weight=1.0,
        kd_weight=1.0,
        feat_weight=beta,
        **needs,
        **recipe,
    )(_with_kd(build))


def _with_kd(build):
    def build_with_kd(cfg, student, teacher, **context):
        return build(cfg, student, teacher, with_kd=True, **context)

    return build_with_kd
