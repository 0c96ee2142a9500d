"""Deep mutual learning (Zhang et al., CVPR 2018): a cohort of students that learn from each other.

``dml``: each member minimises CE plus the KL to its peers; ``dml+kd``: each member's CE is
replaced by the KD recipe against a teacher. One run trains the whole cohort (an ``Ensemble``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import data_utils
from analysis import group_metrics
from config import Config
from distiller import FrozenTeacher, load_teacher
from evaluation import predict
from methods.kd import KD_RECIPE, KDLoss, upcast
from model import Ensemble, check_budget, create_model
from registry import KD_PARAMS, METHODS, Param, non_negative, positive, register_method
from runs import RunResult, train
from teacher_cache import use_teacher_cache


class MutualLearningLoss(nn.Module):
    """Zhang, Xiang, Hospedales & Lu, CVPR 2018, "Deep Mutual Learning".

    Each member i of a cohort of M students minimises

        L_i = CE(z_i, y) + w · T² · 1/(M-1) · Σ_{j≠i} KL(softmax(sg(z_j)/T) ‖ softmax(z_i/T))

    where sg stops the gradient: a member learns from its peers' current predictions but never
    pushes them, so member i's parameters get gradients from L_i alone and Σ_i L_i is minimised
    with one backward pass (simultaneous updates, as public reimplementations do; the paper
    alternates them). With a teacher, ``kd`` (a ``KDLoss``) replaces the CE term by
    (1-α)·CE + α·T_t²·KL(p_t ‖ p_i) for every member. Returns ``ce_i``, ``kd_i`` and ``peer_i``.
    """

    def __init__(self, T: float = 1.0, weight: float = 1.0, kd: KDLoss | None = None):
        super().__init__()
        self.T, self.weight, self.kd = T, weight, kd

    def forward(self, member_logits: torch.Tensor, target: torch.Tensor, teacher_logits=None) -> dict:
        """``member_logits``: (M, B, K); ``teacher_logits``: (B, K), needed with ``kd``."""
        m = len(member_logits)
        if m < 2:
            raise ValueError("mutual learning needs a cohort of at least 2 students (cfg.members >= 2)")
        log_p = F.log_softmax(upcast(member_logits) / self.T, dim=2)  # (M, B, K)
        peers = log_p.detach()
        terms = {}
        for i in range(m):
            if self.kd is None:
                terms[f"ce_{i}"] = F.cross_entropy(member_logits[i], target)
            else:
                terms.update({f"{k}_{i}": v for k, v in self.kd(member_logits[i], teacher_logits, target).items()})
            kl = sum(F.kl_div(log_p[i], peers[j], reduction="batchmean", log_target=True) for j in range(m) if j != i)
            terms[f"peer_{i}"] = self.weight * self.T**2 * kl / (m - 1)
        return terms


class Cohort(nn.Module):
    """Deep mutual learning in the loop's form: ``forward(x, y) -> (ensemble logits, terms)``.

    ``student`` is an ``Ensemble`` (checkpointed with all members); the optional teacher is frozen
    and outside the module tree, as in ``train_kd.Distiller``. Each epoch reports every member's
    test accuracy, the ensemble's, and the members' disagreement.
    """

    def __init__(
        self, group: Ensemble, loss: MutualLearningLoss, teacher: nn.Module | None = None, teacher_bf16: bool = False
    ):
        super().__init__()
        self.student = group
        self.loss = loss
        self.teacher = FrozenTeacher(teacher, bf16=teacher_bf16) if teacher is not None else None

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None = None, teacher_out=None, **_
    ):
        """``teacher_logits``: cached for these views; ``teacher_out``: a cohort's shared teacher already ran."""
        z = self.student.member_logits(x)  # (M, B, K)
        if self.teacher is not None and teacher_logits is None:
            shared = teacher_out[0] if isinstance(teacher_out, tuple) else teacher_out  # (logits, feats) or logits
            teacher_logits = self.teacher(x) if teacher_out is None else shared
        return z.mean(0), self.loss(z, y, teacher_logits)

    def test_metrics(self, loader, amp: bool = False) -> dict:
        logits, labels = zip(*(predict(m, loader, amp) for m in self.student.members), strict=True)
        return group_metrics(logits, labels[0])


def build_cohort_group(cfg: Config) -> Ensemble:
    """``cfg.members`` students ``cfg.model`` at ``cfg.width``, checked against ``cfg.budget``."""
    group = create_model(
        "ensemble",
        num_classes=data_utils.DATASETS[cfg.dataset].num_classes,
        width=cfg.width,
        member=cfg.model,
        k=cfg.members,
    )
    check_budget(group, cfg.budget, f"a cohort of {cfg.members} {cfg.model} x{cfg.width:g}")
    return group


def build_cohort(cfg: Config, group: Ensemble, train_loader=None) -> Cohort:
    teacher = load_teacher(cfg.teacher, cfg) if METHODS.get(cfg.method).needs_teacher else None
    kd = KDLoss(cfg.T, cfg.ce_weight, cfg.kd_weight) if teacher is not None else None
    return Cohort(group, MutualLearningLoss(cfg.peer_T, cfg.peer_weight, kd), teacher, cfg.teacher_amp == "bf16")


def mutual_learning(cfg: Config) -> RunResult:
    """Train (or reuse) a cohort of ``cfg.members`` students with ``cfg.method`` "dml" or "dml+kd".

    The result's model is the cohort's ``Ensemble``; its history has each member's test top-1
    (``test_top1_m<i>``), the ensemble's (``test_top1``) and their disagreement per epoch.
    """
    if METHODS.get(cfg.method).run is not mutual_learning:
        raise ValueError(f"mutual_learning trains method 'dml' or 'dml+kd', not {cfg.method!r}")
    wrap = use_teacher_cache if cfg.teacher_cache and METHODS.get(cfg.method).needs_teacher else None
    return train(cfg, make_task=build_cohort, wrap_loader=wrap, make_student=build_cohort_group)


def group_model(cfg: Config, k: int, width: float) -> Ensemble:
    num_classes = data_utils.DATASETS[cfg.dataset].num_classes
    return create_model("ensemble", num_classes=num_classes, width=width, member=cfg.model, k=k)


def train_group(cfg: Config, **_) -> Ensemble:
    """``multi_student.py --group dml``: the cohort, trained (or reused)."""
    return mutual_learning(cfg).model


PARAMS = (
    Param("peer_T", float, "DML: temperature of the mutual-learning term", check=positive),
    Param("peer_weight", float, "DML: weight of the mutual-learning term", check=non_negative),
)
SOURCE = "Zhang et al. 2018, deep mutual learning: CE + KL to each peer at T = 1, weight 1"
# what both variants share: one run trains the cohort; the published peer term (T 1, weight 1)
COHORT = dict(
    run=mutual_learning,
    make_student=build_cohort_group,  # the loop trains it: its runs join cohorts of their stream
    make_task=build_cohort,
    group=train_group,
    group_model=group_model,
    peer_T=1.0,
    peer_weight=1.0,
)
register_method("dml", source=SOURCE, params=PARAMS, needs_teacher=False, **COHORT)(None)
register_method(
    "dml+kd",
    source=SOURCE + "; each member's CE replaced by the project's KD recipe",
    params=(*PARAMS, *KD_PARAMS),
    **COHORT,
    **KD_RECIPE,
)(None)
