"""Feature-partition specialists (this project's design): K students each regress a slice of the
teacher's pooled embedding (stage 1, method ``partition``); then a linear head learns on the frozen
members' concatenated outputs (stage 2, method ``specialists``), or a probe on one member.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

import data_utils
from analysis import r_squared
from checkpoints import load_weights, read_checkpoint
from config import Config
from data_utils import unaugmented
from distiller import FrozenTeacher, load_teacher
from evaluation import evaluate, predict
from methods.kd import upcast
from model import Specialists, check_budget, create_model
from registry import CE_WEIGHT, Param, register_method
from runs import RunResult, train


def partition(dim: int, k: int) -> list[torch.Tensor]:
    """``k`` contiguous index slices that cover ``range(dim)`` exactly once (sizes differ by <= 1)."""
    if not 1 <= k <= dim:
        raise ValueError(f"cannot split an embedding of {dim} dimensions among {k} students; need 1 <= k <= {dim}")
    return list(torch.arange(dim).tensor_split(k))


class PartitionLoss(nn.Module):
    """Feature-partition specialists: member k regresses its own slice S_k of the teacher's
    pooled embedding f_t(x), the slices partitioning its dimensions (``partition``):

        L = Σ_k mean_{b, d ∈ S_k} (s_k(x_b)_d − f_t(x_b)_d)²

    (the hint loss of Romero et al., ICLR 2015, on the embedding, split among K students).
    Returns ``mse_k`` per member.
    """

    def __init__(self, slices: Sequence[torch.Tensor]):
        super().__init__()
        self.slices = [s.tolist() for s in slices]

    def forward(self, outputs: Sequence[torch.Tensor], target: torch.Tensor) -> dict:
        return {
            f"mse_{k}": F.mse_loss(upcast(out), target[:, idx].float())
            for k, (out, idx) in enumerate(zip(outputs, self.slices, strict=True))
        }


class PartitionRegression(nn.Module):
    """Stage 1 of the specialists: each member regresses its slice of the teacher's embedding.

    The logits it returns (and its test accuracy) are those of the specialists through their
    head, initialised to the teacher's own classifier: they show how much of the teacher's
    decision the regressed embedding carries. With ``ce_weight`` > 0 the cross-entropy of those
    logits is added to the regression (term ``ce``). With ``target_stats`` (the embedding's mean
    and std per dimension) the members regress the z-scored embedding, so every dimension weighs
    the same in the MSE, and the head is expected to undo the scaling (``fold_standardization``).
    Each epoch also reports R² of every slice, in the space the members regress.
    """

    def __init__(
        self,
        group: Specialists,
        teacher: nn.Module,
        slices: Sequence[torch.Tensor],
        teacher_bf16: bool = False,
        ce_weight: float = 0.0,
        target_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.student = group
        self.teacher = FrozenTeacher(teacher, bf16=teacher_bf16)
        self.loss = PartitionLoss(slices)
        self.ce_weight = ce_weight
        self.standardized = target_stats is not None
        mean, std = target_stats if self.standardized else (torch.zeros(0), torch.ones(0))
        self.register_buffer("target_mean", mean.clone())  # (D,) or empty
        self.register_buffer("target_std", std.clone())  # (D,) or empty
        self._targets: dict[int, torch.Tensor] = {}  # the teacher's embeddings per evaluation loader, computed once
        self.needs_features = True  # a cohort's shared teacher hands its features (``teacher_out``)

    def _target(self, x: torch.Tensor, teacher_out=None) -> torch.Tensor:
        out = teacher_out if teacher_out is not None else self.teacher(x, features=True)
        emb = out[1]["pooled"].float()  # (B, D)
        return (emb - self.target_mean) / self.target_std if self.standardized else emb

    def forward(self, x: torch.Tensor, y: torch.Tensor, teacher_out=None, **_):
        """``teacher_out``: the teacher's outputs with features if a cohort already ran it on this batch."""
        outputs = self.student.member_outputs(x)
        logits = self.student.head(torch.cat(outputs, 1))  # (B, K)
        terms = self.loss(outputs, self._target(x, teacher_out))
        if self.ce_weight:
            terms["ce"] = self.ce_weight * F.cross_entropy(logits, y)
        return logits, terms

    def test_metrics(self, loader, amp: bool = False) -> dict:
        metrics = evaluate(self.student, loader, amp)
        if id(loader) not in self._targets:  # validation and test each have their own
            self._targets[id(loader)] = predict(self.student, loader, amp, output=self._target)[0]  # (N, D)
        pred = predict(self.student, loader, amp, output=self.student.embed)[0]  # (N, D)
        target = self._targets[id(loader)]
        for k, idx in enumerate(self.loss.slices):
            metrics[f"r2_{k}"] = r_squared(pred[:, idx], target[:, idx])
        metrics["r2"] = r_squared(pred, target)
        return metrics


@torch.no_grad()
def embedding_stats(teacher: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per dimension of the teacher's pooled embedding over ``loader``'s images."""
    emb = predict(teacher, loader, output=lambda x: teacher(x, features=True)[1]["pooled"])[0].float()  # (N, D)
    return emb.mean(0), emb.std(0).clamp_min(1e-6)


@torch.no_grad()
def fold_standardization(head: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make ``head`` read z-scored inputs u = (e − mean)/std as it read e: W·e + b = (W·diag(std))·u + (b + W·mean),
    on its first linear layer (the whole head when it is linear, the first of an MLP head)."""
    first = head if isinstance(head, nn.Linear) else head[0]
    first.bias.add_(first.weight @ mean)
    first.weight.mul_(std)


def head_hidden(teacher: nn.Module, where: str) -> int:
    """0 for a teacher with a linear head; the hidden width of a torchvision-layout (``_tv``) MLP head,
    which the specialists' head then copies; anything else is refused."""
    head = teacher.classifier
    if isinstance(head, nn.Linear):
        return 0
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if isinstance(head, nn.Sequential) else []
    if len(linears) != 3:
        raise ValueError(
            f"specialists reuse the teacher's head on their concatenated outputs, but the teacher at {where} has a "
            f"head that is neither linear nor torchvision's VGG classifier: {type(head).__name__}"
        )
    return linears[0].out_features


def build_specialists(cfg: Config) -> Specialists:
    """``cfg.members`` specialists for the teacher's embedding (stage 1: head = the teacher's
    classifier, members trainable; stage 2, method "specialists": members frozen, from stage 1)."""
    teacher = load_teacher(cfg.teacher, cfg)
    hidden = head_hidden(teacher, cfg.teacher)
    slices = partition(teacher.embed_dim, cfg.members)
    frozen = cfg.method == "specialists"
    group = create_model(
        "specialists",
        num_classes=data_utils.DATASETS[cfg.dataset].num_classes,
        width=cfg.width,
        member=cfg.model,
        out_dims=[len(s) for s in slices],
        frozen=frozen,
        **({"head_hidden": hidden} if hidden else {}),  # a linear head's arch stays as before
    )
    check_budget(group, cfg.budget, f"{cfg.members} specialists {cfg.model} x{cfg.width:g} and their head")
    if frozen:
        load_weights(group, read_checkpoint(cfg.init_from)["model"], cfg.init_from)
        if cfg.probe_member >= 0:  # one frozen member under a fresh linear head of its own
            if cfg.probe_member >= cfg.members:
                raise ValueError(f"probe_member={cfg.probe_member}: the group has members 0-{cfg.members - 1}")
            member = group.members[cfg.probe_member]
            probe = create_model(
                "specialists",
                num_classes=group.num_classes,
                width=cfg.width,
                member=cfg.model,
                out_dims=[member.num_classes],
                frozen=True,
            )
            probe.members[0].load_state_dict(member.state_dict())
            return probe
    else:  # contiguous slices in order: the concatenated outputs line up with the teacher's embedding
        group.head.load_state_dict(teacher.classifier.state_dict())
        group.head.requires_grad_(False)  # stage 1 trains the students only; the head just reads them
    return group


def _partition_task(cfg: Config, group: Specialists, train_loader=None) -> PartitionRegression:
    teacher = load_teacher(cfg.teacher, cfg)
    slices = partition(teacher.embed_dim, cfg.members)
    stats = None
    if cfg.standardize_targets:  # statistics of the students' own training images, unaugmented
        stats = embedding_stats(teacher, unaugmented(train_loader))
        fold_standardization(group.head, *stats)
    ce_weight = cfg.ce_weight or 0.0
    return PartitionRegression(group, teacher, slices, cfg.teacher_amp == "bf16", ce_weight, stats)


def partition_stage(cfg: Config) -> RunResult:
    """Stage 1 of the specialists (method "partition"): ``cfg.members`` students regress the slices
    of the teacher's embedding for ``cfg.epochs``. A plain ``run(cfg)``, so ``run_many`` can run many."""
    return train(replace(cfg, method="partition"), make_task=_partition_task, make_student=build_specialists)


def head_stage(cfg: Config) -> RunResult:
    """Stage 2 (method "specialists"): the stage-1 run ``cfg.init_from``'s members frozen, a linear
    head (or, with ``cfg.probe_member``, one member's probe) trained with cross-entropy."""
    return train(replace(cfg, method="specialists"), make_student=build_specialists)


def head_config(stage1: Config, stage1_dir: str, head_epochs: int = 10, probe_member: int = -1) -> Config:
    """The head (or probe) stage's config for the stage-1 run ``stage1`` saved in ``stage1_dir``."""
    budget = stage1.budget if probe_member < 0 else 0  # a probe is a diagnostic, not a group
    return replace(
        stage1, method="specialists", epochs=head_epochs, init_from=stage1_dir, probe_member=probe_member, budget=budget
    )


def train_specialists(cfg: Config, head_epochs: int = 10) -> tuple[RunResult, RunResult]:
    """Stage 1 (``partition_stage``), then the head on the frozen members for ``head_epochs``."""
    stage1 = partition_stage(cfg)
    return stage1, head_stage(head_config(replace(cfg, method="partition"), stage1.run_dir, head_epochs))


def train_probes(stage1: RunResult, head_epochs: int = 10) -> list[RunResult]:
    """A linear probe per specialist: member k of the stage-1 run, frozen, under its own linear head
    trained with cross-entropy for ``head_epochs`` (how much of the classes each slice carries)."""
    probes = [head_config(stage1.config, stage1.run_dir, head_epochs, k) for k in range(stage1.config.members)]
    return [head_stage(c) for c in probes]


def check_head_stage(cfg: Config) -> None:
    if not cfg.init_from:
        raise ValueError(
            "method 'specialists' trains a head on the frozen members of a finished 'partition' run: pass "
            "--init-from runs/<partition run> (multi_student.py --group specialists runs both stages)"
        )


def train_group(cfg: Config, head_epochs: int = 10, **_) -> list[nn.Module]:
    """``multi_student.py --group specialists``: both stages, trained (or reused); the final group."""
    return [train_specialists(cfg, head_epochs)[1].model]


def group_model(cfg: Config, k: int, width: float) -> Specialists:
    """``k`` specialists at ``width`` with their head, for the teacher ``cfg.teacher`` (to fit a budget)."""
    dims = [len(s) for s in partition(load_teacher(cfg.teacher, cfg).embed_dim, k)]
    return create_model(
        "specialists",
        num_classes=data_utils.DATASETS[cfg.dataset].num_classes,
        width=width,
        member=cfg.model,
        out_dims=dims,
    )


def _check_probe(name: str, value) -> None:
    if value < -1:
        raise ValueError(f"{name}={value}: a member index (0 ... members - 1), or -1 for the whole group")


STANDARDIZE = Param(
    "standardize_targets", bool, "partition: regress the teacher's embedding z-scored per dimension", default=False
)
PROBE = Param(
    "probe_member",
    int,
    "specialists' head stage: a probe on this member alone; -1: all",
    default=-1,
    check=_check_probe,
)
register_method(
    "partition",
    source="this project: members regress slices of the teacher's pooled embedding (MSE; CE weight 0)",
    params=(CE_WEIGHT, STANDARDIZE),
    needs_features=True,
    run=partition_stage,
    make_student=build_specialists,
    make_task=_partition_task,
)(None)
register_method(
    "specialists",
    source="this project: a linear head on frozen partition members",
    params=(PROBE,),
    needs_features=True,
    run=head_stage,
    group=train_group,
    group_model=group_model,
    check=check_head_stage,
)(None)
