"""Feature distillation: losses on intermediate representations, and what the notebooks read of features.

Each feature method is one file in ``methods/`` (``fitnet``, ``at``, ``sp``, ``pkt``, ``rkd``, ``crd``),
registered alone and with Hinton's KD term added (``fitnet+kd``, ...):

    python train_kd.py --profile cpu --teacher runs/<teacher> --method at
    python train_kd.py --profile cpu --teacher runs/<teacher> --method fitnet+kd --hint-stage 2

Without KD the loss is w_ce·CE + β·feature term, with KD w_ce·CE + w_kd·T²·KL + β·feature term.
Unset weights take each method's published recipe (``DEFAULT_BETA``: the CIFAR-100 benchmark of
Tian et al., ICLR 2020, with CE 1; ``+kd``: CE 1, KD 1, T 4 as RepDistiller combines them);
``--feat-weight``, ``--ce-weight``, ``--kd-weight``, ``--T`` override them. Adapters (the FitNets
regressor, CRD's heads) are submodules of the loss, so the one training loop optimises and
checkpoints them with the student; the teacher is never optimised.
"""

from __future__ import annotations

import torch
from torch import nn

from methods._feature import FeatureKD
from methods.at import ATLoss, attention_map
from methods.crd import CRDLoss, nce_loss
from methods.fitnet import INPUT_SIZE, ConvReg, HintLoss, HintPretrain, stage_shape
from methods.pkt import PKTLoss, cosine_kernel
from methods.rkd import RKDLoss, pairwise_distances, triplet_angles
from methods.sp import SPLoss, batch_similarity
from registry import METHODS

__all__ = [
    "ATLoss",
    "CRDLoss",
    "ConvReg",
    "DEFAULT_BETA",
    "FeatureKD",
    "HintLoss",
    "HintPretrain",
    "INPUT_SIZE",
    "PKTLoss",
    "RKDLoss",
    "SPLoss",
    "attention_map",
    "batch_similarity",
    "cosine_kernel",
    "feature_methods",
    "nce_loss",
    "pairwise_distances",
    "stage_outputs",
    "stage_shape",
    "triplet_angles",
]


def feature_methods() -> list[str]:
    """The registered methods that read the teacher's features and have a β (``feat_weight``)."""
    return [n for n in METHODS.names() if METHODS[n].needs_features and "feat_weight" in METHODS[n].recipe]


# β of each feature method in the CIFAR-100 benchmark (CE weight 1, no KD term), from the registry.
DEFAULT_BETA = {n: METHODS[n].recipe["feat_weight"] for n in feature_methods() if "kd_weight" not in METHODS[n].recipe}


@torch.no_grad()
def stage_outputs(model: nn.Module, loader, n: int = 1000) -> list[torch.Tensor]:
    """The first ``n`` images' stage outputs (post-ReLU), flattened: a list of (n, C*H*W) tensors."""
    model.eval()
    device = next(model.parameters()).device
    chunks, seen = [], 0
    for x, *_ in loader:
        chunks.append([f.flatten(1).float().cpu() for f in model(x.to(device), features=True)[1]["stages"]])
        seen += len(x)
        if seen >= n:
            break
    return [torch.cat(parts)[:n] for parts in zip(*chunks, strict=True)]
