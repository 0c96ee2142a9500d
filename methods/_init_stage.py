"""Methods whose release trains an init stage before the main one (FSP, AB, FT), as the first epochs of one run.

RepDistiller (``train_student.py`` with ``helper/pretrain.py``) trains AB, FT and FSP in two stages:
30 init epochs (``--init_epochs 30``) on the method's own objective alone, with a fresh SGD at the
main learning rate and no decay, then the usual 240 epochs. Here both stages are one run of the one
loop: the loss is told the epoch (``set_epoch``) and returns, for its first ``init_epochs`` epochs,
only the init term, named ``<method>_init``; from then on w_ce·CE (+ KD) + β·term, as every feature
method. What the init stage must not move (the classifier, say) gets no gradient, and the loop's
optimiser (``zero_grad(set_to_none=True)``; SGD and Adam skip a parameter whose grad is None, weight
decay and momentum included) leaves it exactly as it was.

The init stage is a share of the run: ``init_fraction`` (the release's 30 of 30 + 240 epochs,
``init_epochs = max(1, round(init_fraction · epochs))``, 0: no init stage), so a 30-epoch run has 3.
How this differs from the release:

- one optimiser and one learning-rate schedule over both stages: the init stage's epochs count
  towards ``epochs``, ``milestones`` and a cosine schedule (the release runs 30 + 240 epochs, its
  init stage with its own SGD at a constant 0.05, then decays at 150/180/210 of the 240). To train
  the release's schedule, pass ``--epochs 270 --milestones 180 210 240``; the momentum buffers of
  parameters trained in both stages carry over instead of restarting;
- the whole task is in train mode in both stages, so the student's batch-norm running statistics
  follow its (unchanging) weights during FT's init stage, where the release keeps it in eval mode;
- the init-stage epochs are evaluated and logged like any other (the student is near chance there:
  its classifier has not trained yet); the term columns of the stage a run is not in are empty.

A parameter without a gradient in one stage is what DistributedDataParallel, as the loop builds it
(``find_unused_parameters`` off), refuses, so these methods run in one process (``check_init_stage``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distributed import launched_world
from methods._feature import BENCHMARK, WITH_KD, FeatureKD
from methods.kd import KDLoss
from registry import CE_WEIGHT, FEAT_WEIGHT, KD_WEIGHT, Param, T, fraction, register_method

# RepDistiller train_student.py: --init_epochs 30 before --epochs 240
RELEASE_INIT_FRACTION = 30 / 270
INIT_FRACTION = Param(
    "init_fraction",
    float,
    "AB/FT/FSP: share of the run's epochs spent in the method's init stage, first (0: none)",
    check=fraction,
)
INIT_SOURCE = (
    "init stage: RepDistiller helper/pretrain.py, 30 epochs (train_student.py --init_epochs) before the "
    "240, SGD at the main lr 0.05 (momentum 0.9, wd 5e-4), as init_fraction 30/270 of one run"
)


def init_epochs(epochs: int, share: float) -> int:
    """Epochs of a run of ``epochs`` given to the init stage: round(share · epochs), at least 1 if share > 0."""
    return max(1, round(share * epochs)) if share else 0


def check_init_stage(cfg) -> None:
    """The init stage must leave the main stage at least one epoch, and the run must be one process."""
    if launched_world() > 1:
        raise ValueError(
            f"method {cfg.method!r} leaves parameters without a gradient in one of its stages (the classifier "
            "in its init stage), which DistributedDataParallel as this loop builds it (find_unused_parameters "
            "off) refuses at the second step: run it in one process"
        )
    n = init_epochs(cfg.epochs, cfg.init_fraction)
    if n >= cfg.epochs:
        raise ValueError(
            f"method {cfg.method!r}: its init stage takes {n} of the run's {cfg.epochs} epochs "
            f"(init_fraction {cfg.init_fraction:g}), leaving none for the main stage: pass --epochs "
            f"{n + 1} or more, a smaller --init-fraction, or --init-fraction 0 to skip the init stage"
        )


class InitStageKD(FeatureKD):
    """A feature method with an init stage: ``feature.init_loss`` alone for the first ``init_epochs``
    epochs, returned as ``{"<name>_init": L_init}`` (unweighted, as the release); then ``FeatureKD``'s
    w_ce·CE (+ w_kd·T²·KL) + β·``feature``. With β = 0 the main term is not computed at all (the
    release's main stage of AB and FSP: CE alone), so whatever only it would train gets no gradient.
    """

    def __init__(self, name: str, feature: nn.Module, beta: float, init_epochs: int, kd=None, ce_weight=1.0):
        super().__init__(name, feature, beta, kd, ce_weight)
        self.init_epochs, self.epoch = init_epochs, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def in_init(self) -> bool:
        return self.epoch < self.init_epochs

    def forward(self, logits_s, logits_t, target, s_feats=None, t_feats=None, **extras) -> dict[str, torch.Tensor]:
        if self.in_init:
            return {f"{self.name}_init": self.feature.init_loss(s_feats, t_feats)}
        if self.beta:
            return super().forward(logits_s, logits_t, target, s_feats, t_feats, **extras)
        if self.kd is not None:
            return self.kd(logits_s, logits_t, target)
        return {"ce": self.ce_weight * F.cross_entropy(logits_s, target)}


def register_with_init(name: str, feature, beta: float, source: str, params: tuple[Param, ...] = (), **recipe):
    """Register ``name`` and ``name+kd`` as ``register_feature`` does, the loss an ``InitStageKD``:
    ``feature(cfg, student, teacher, **context)`` builds the term (an ``nn.Module`` with ``init_loss``),
    ``beta`` is the main stage's β, and both read ``init_fraction`` (the release's 30/270)."""
    source = f"{source}; {INIT_SOURCE}; {BENCHMARK}"
    params = (*params, INIT_FRACTION)
    recipe = dict(recipe, init_fraction=RELEASE_INIT_FRACTION)
    common = dict(needs_features=True, check=check_init_stage, ce_weight=1.0, feat_weight=beta, **recipe)

    def build(cfg, student: nn.Module, teacher: nn.Module, with_kd: bool = False, **context) -> InitStageKD:
        kd = KDLoss(cfg.T, cfg.ce_weight, cfg.kd_weight) if with_kd else None
        term = feature(cfg, student, teacher, **context)
        n = init_epochs(cfg.epochs, cfg.init_fraction)
        return InitStageKD(name, term, cfg.feat_weight, n, kd, ce_weight=cfg.ce_weight)

    def build_with_kd(cfg, student: nn.Module, teacher: nn.Module, **context) -> InitStageKD:
        return build(cfg, student, teacher, with_kd=True, **context)

    alone = (CE_WEIGHT, FEAT_WEIGHT, *params)
    register_method(name, source=source, params=alone, **common)(build)
    register_method(
        f"{name}+kd", source=source + WITH_KD, params=(*alone, T, KD_WEIGHT), T=4.0, kd_weight=1.0, **common
    )(build_with_kd)
