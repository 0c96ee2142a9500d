"""Class-subset specialists (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
Network", section 5): a generalist over every class, plus specialists that each tell apart a small
group of classes the teacher confuses, all other classes lumped into one "dustbin"; at inference a
specialist speaks only when the generalist's top classes fall in its group.

Method ``class_specialist`` trains one specialist: a student with the generalist's architecture,
started from its weights (``init_from``), under ``SubsetLoss`` for the classes ``special_classes``.
``multi_student.train_class_specialists`` runs the whole recipe (generalist, groups, specialists);
``combine`` is the paper's inference rule.

Where this differs from the paper, and why:
- Groups: the paper clusters the columns of the covariance of the generalist's predictions with
  online k-means (for thousands of classes); ``confusable_groups`` grows disjoint groups greedily
  from the most-covarying pair of the teacher's predictions (ten or a hundred classes: a greedy rule
  is deterministic and needs no k).
- No oversampling of the special classes (the paper draws half of each batch from them, then
  corrects the dustbin logit): a group of 2 of CIFAR-10's classes is already a fifth of the data.
- Targets: the paper trains specialists on hard labels (its recipe here: ``ce_weight`` 1,
  ``kd_weight`` 0); ``kd_weight`` > 0 adds the teacher's soft targets, collapsed the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from methods.kd import upcast
from registry import CE_WEIGHT, KD_WEIGHT, Param, T, register_method


def parse_classes(text: str) -> list[int]:
    """``"3,5"`` -> ``[3, 5]``; the classes of one specialist."""
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"special_classes={text!r}: give class indices separated by commas, e.g. 3,5") from None
    if not classes or len(set(classes)) != len(classes) or min(classes) < 0:
        raise ValueError(f"special_classes={text!r}: need one or more distinct class indices >= 0, e.g. 3,5")
    return classes


def collapse(log_p: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Log-probabilities over all C classes -> over the special classes and a dustbin holding the rest.

    log_p: (B, C) -> (B, |S| + 1), the last column log Σ_{c ∉ S} p_c."""
    mask = torch.ones(log_p.shape[1], dtype=torch.bool, device=log_p.device)
    mask[list(classes)] = False
    dustbin = torch.logsumexp(log_p[:, mask], dim=1, keepdim=True)  # (B, 1)
    return torch.cat([log_p[:, list(classes)], dustbin], dim=1)  # (B, |S| + 1)


def collapse_labels(y: torch.Tensor, classes: Sequence[int], num_classes: int) -> torch.Tensor:
    """Labels 0..C-1 -> the index of the class in ``classes``, or |S| (the dustbin)."""
    lookup = torch.full((num_classes,), len(classes), dtype=torch.long, device=y.device)
    lookup[list(classes)] = torch.arange(len(classes), device=y.device)
    return lookup[y]


class SubsetLoss(nn.Module):
    """One specialist's loss (Hinton et al. 2015, section 5.2): the student's C outputs are read
    as a distribution over its special classes S plus a dustbin (``collapse``), and

        L = w_ce · CE(collapse(softmax(z_s)), ỹ) + w_kd · T² · KL(collapse(softmax(z_t/T)) ‖ collapse(softmax(z_s/T)))

    where ỹ is the label's index in S, or the dustbin. How the student spreads the dustbin's mass
    over the classes outside S is left free: nothing rewards it. Returns ``{"ce", "kd"}`` weighted.
    """

    def __init__(self, classes: Sequence[int], T: float = 4.0, ce_weight: float = 1.0, kd_weight: float = 0.0):
        super().__init__()
        self.classes, self.T, self.ce_weight, self.kd_weight = list(classes), T, ce_weight, kd_weight

    def forward(self, logits_s, logits_t, target, **_) -> dict[str, torch.Tensor]:
        z_s, z_t = upcast(logits_s), upcast(logits_t)  # (B, C) each
        hard = collapse(F.log_softmax(z_s, 1), self.classes)  # (B, |S| + 1)
        terms = {"ce": self.ce_weight * F.nll_loss(hard, collapse_labels(target, self.classes, z_s.shape[1]))}
        if self.kd_weight:
            log_s = collapse(F.log_softmax(z_s / self.T, 1), self.classes)  # (B, |S| + 1)
            log_t = collapse(F.log_softmax(z_t / self.T, 1), self.classes)
            kl = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
            terms["kd"] = self.kd_weight * self.T**2 * kl
        return terms


def confusable_groups(probs: torch.Tensor, k: int, size: int) -> list[list[int]]:
    """``k`` disjoint groups of ``size`` classes that a model's predictions ``probs`` (N, C) confuse.

    Confusion is the covariance of the predicted probabilities across images (two classes that
    rise and fall together are told apart badly), as in Hinton et al. 2015, section 5.3. Each group
    starts from the most-covarying pair of unused classes and takes in, one at a time, the unused
    class with the largest summed covariance with the group."""
    C = probs.shape[1]
    if k < 1 or size < 2 or k * size > C:
        raise ValueError(f"{k} groups of {size} classes do not fit in {C} disjoint classes (need size >= 2)")
    cov = torch.cov(probs.double().T)  # (C, C)
    cov.fill_diagonal_(-torch.inf)
    free = torch.ones(C, dtype=torch.bool)
    groups = []
    for _ in range(k):
        pair = cov.masked_fill(~(free[:, None] & free[None, :]), -torch.inf)
        a, b = divmod(int(pair.argmax()), C)
        group = [a, b]
        free[group] = False
        while len(group) < size:
            score = cov[group].sum(0).masked_fill(~free, -torch.inf)  # (C,)
            group.append(int(score.argmax()))
            free[group[-1]] = False
        groups.append(sorted(group))
    return groups


@torch.no_grad()
def combine(
    p_general: torch.Tensor,
    p_special: Sequence[torch.Tensor],
    groups: Sequence[Sequence[int]],
    top_n: int = 1,
    iters: int = 200,
) -> torch.Tensor:
    """The paper's inference rule (Hinton et al. 2015, section 5.4): per image, the specialists
    whose group meets the generalist's ``top_n`` classes are active (A), and the answer is

        q* = argmin_q KL(p_g ‖ q) + Σ_{m ∈ A} KL(p_m ‖ collapse_m(q))

    p_general: (N, C); p_special[m]: (N, |S_m| + 1), specialist m's collapsed distribution -> (N, C).

    The objective is convex in q over the simplex; it is the negative log-likelihood of q under
    observations some of which are coarsened, so the EM step q_c ← (p_g,c + Σ_{m∈A} p_m(bin_m(c)) ·
    q_c / q(bin_m(c))) / (1 + |A|) decreases it monotonically to the optimum (the paper fits
    softmax logits by gradient descent instead; the minimiser is the same). With no active
    specialist q* = p_g."""
    top = p_general.topk(top_n, dim=1).indices  # (N, n)
    q = p_general.double().clone()  # (N, C)
    parts = []
    for p_m, classes in zip(p_special, groups, strict=True):
        active = torch.isin(top, torch.tensor(list(classes))).any(1)  # (N,)
        if active.any():
            parts.append((p_m.double(), list(classes), active))
    count = 1 + sum(active.double() for _, _, active in parts)  # (N,) or a number
    for _ in range(iters):
        new = p_general.double().clone()
        for p_m, classes, active in parts:
            coarse = collapse(q.clamp_min(1e-300).log(), classes).exp()  # (N, |S| + 1)
            ratio = p_m / coarse.clamp_min(1e-300)  # (N, |S| + 1)
            per_class = ratio[:, -1:].expand_as(q).clone()  # (N, C): the dustbin's ratio everywhere ...
            per_class[:, classes] = ratio[:, :-1]  # ... but on the special classes
            new += active[:, None] * q * per_class
        q = new / torch.as_tensor(count)[..., None] if parts else new
    return q.float()


SPECIAL_CLASSES = Param(
    "special_classes",
    str,
    "class_specialist: its classes, comma-separated (e.g. 3,5); multi_student.train_class_specialists "
    "picks them from the teacher's confusions",
    default="",
)


def check(cfg) -> None:
    if not cfg.special_classes:
        raise ValueError(
            "method 'class_specialist' needs --special-classes (e.g. 3,5): the classes it tells apart; "
            "multi_student.train_class_specialists picks them from the teacher's confusions"
        )
    parse_classes(cfg.special_classes)


@register_method(
    "class_specialist",
    source="Hinton, Vinyals & Dean 2015, section 5 (specialists with a dustbin class, hard targets, "
    "started from the generalist); no released code",
    params=(SPECIAL_CLASSES, T, CE_WEIGHT, KD_WEIGHT),
    check=check,
    standalone=False,
    T=4.0,
    ce_weight=1.0,
    kd_weight=0.0,
)
def build(cfg, student: nn.Module, teacher: nn.Module, num_classes: int, **_) -> nn.Module:
    classes = parse_classes(cfg.special_classes)
    if max(classes) >= num_classes or len(classes) >= num_classes:
        raise ValueError(
            f"special_classes={cfg.special_classes!r}: the data set has classes 0-{num_classes - 1}, and a "
            "specialist needs at least one class left for its dustbin"
        )
    return SubsetLoss(classes, cfg.T, cfg.ce_weight, cfg.kd_weight)
