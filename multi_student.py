"""Several students instead of one: ensembles, deep mutual learning, feature-partition specialists.

Every variant trains in the one loop of ``train_eval``; what differs is the network being
trained (a group of students, checkpointed and rebuilt like any model) and the task around it.

    members = train_ensemble(cfg, k=4)                    # 4 students trained separately (cfg.method)
    cohort = mutual_learning(replace(cfg, members=2))     # 2 students trained together (DML)
    stage1, final = train_specialists(replace(cfg, members=4, teacher=...))
    evaluate_group([r.model for r in members], test_loader, teacher_logits)

A group's total parameter count can be held under ``cfg.budget``: ``width_for_budget`` finds
the widest members that fit and every group run checks it when it builds its students.

    python multi_student.py --profile cpu --group dml --members 2 --budget 247050
    python multi_student.py --profile cpu --group ensemble --method kd --members 4 --budget 247050 --teacher runs/<t>
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

import data_utils
from analysis import group_metrics, r_squared
from data_utils import unaugmented
from model import Ensemble, Specialists, count_flops, count_params, create_model, ensemble, read_checkpoint, specialists
from teacher_cache import use_teacher_cache
from train_eval import (
    METHODS,
    USAGE_ERRORS,
    Config,
    RunResult,
    build_parser,
    config_from_args,
    evaluate,
    is_main_process,
    make_loaders,
    predict,
    register_method,
    train,
)
from train_kd import KD_RECIPE, FrozenTeacher, KDLoss, load_teacher, run_all, upcast

if __name__ == "__main__":
    # Run as the importable module, then stop: group models and methods register once, as
    # `multi_student`, never a second time as `__main__`.
    import multi_student

    multi_student.main(sys.argv[1:])
    sys.exit(0)

# ----------------------------------------------------------------------------- budgets


def partition(dim: int, k: int) -> list[torch.Tensor]:
    """``k`` contiguous index slices that cover ``range(dim)`` exactly once (sizes differ by <= 1)."""
    if not 1 <= k <= dim:
        raise ValueError(f"cannot split an embedding of {dim} dimensions among {k} students; need 1 <= k <= {dim}")
    return list(torch.arange(dim).tensor_split(k))


def check_budget(model: nn.Module, budget: int, what: str = "the group") -> int:
    """The parameter count of ``model``; raises if it exceeds ``budget`` (0: no budget)."""
    n = count_params(model)
    if budget and n > budget:
        raise ValueError(
            f"{what} has {n:,} parameters, over the budget of {budget:,}; "
            "lower the width or the number of students (width_for_budget finds the widest that fits)"
        )
    return n


def width_for_budget(build: Callable[[float], nn.Module], budget: int, step: float = 1 / 256) -> float:
    """The largest width on a grid of ``step`` whose model ``build(width)`` fits in ``budget`` parameters.

    Parameter counts grow monotonically with the width (channels are rounded widths), so a
    binary search over the grid finds it.
    """

    def fits(n: int) -> bool:
        return count_params(build(n * step)) <= budget

    if not fits(1):
        raise ValueError(f"even width {step:g} needs more than {budget:,} parameters")
    lo, hi = 1, 2
    while fits(hi):  # grow until the budget is exceeded
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step


# ----------------------------------------------------------------------------- losses


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


# ----------------------------------------------------------------------------- evaluation of a group


def evaluate_group(models: Sequence[nn.Module], loader, teacher_logits=None, amp: bool = False) -> dict:
    """Members' and ensemble's accuracy, diversity, teacher agreement, size and cost of a group.

    ``models``: the members (classifiers of the same classes), or one ``Ensemble``.
    """
    if isinstance(models, Ensemble):
        models = list(models.members)
    logits = []
    for m in models:
        z, labels = predict(m, loader, amp)
        logits.append(z)
    out = group_metrics(logits, labels, teacher_logits)
    member_top1 = [out.pop(f"top1_m{i}") for i in range(len(models))]
    return {
        "members": len(models),
        "params": sum(count_params(m) for m in models),
        "MFLOPs": sum(count_flops(m) for m in models) / 1e6,
        "member_top1_mean": sum(member_top1) / len(member_top1),
        "member_top1": member_top1,
        "ensemble_top1": out.pop("top1"),
        "ensemble_top5": out.pop("top5"),
        "ensemble_top1_prob": out.pop("top1_prob"),
        **out,
    }


# ----------------------------------------------------------------------------- the tasks the loop trains


class Cohort(nn.Module):
    """Deep mutual learning in the loop's form: ``forward(x, y) -> (ensemble logits, terms)``.

    ``student`` is an ``Ensemble`` (checkpointed with all members); the optional teacher is frozen
    and outside the module tree, as in ``train_kd.Distiller``. Each epoch reports every member's
    test accuracy, the ensemble's, and the members' disagreement.
    """

    needs_features = False

    def __init__(
        self, group: Ensemble, loss: MutualLearningLoss, teacher: nn.Module | None = None, teacher_bf16: bool = False
    ):
        super().__init__()
        self.student = group
        self.loss = loss
        self.teacher = FrozenTeacher(teacher, bf16=teacher_bf16) if teacher is not None else None

    def forward(self, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None = None, **_):
        z = self.student.member_logits(x)  # (M, B, K)
        if self.teacher is not None and teacher_logits is None:
            teacher_logits = self.teacher(x)
        return z.mean(0), self.loss(z, y, teacher_logits)

    def test_metrics(self, loader, amp: bool = False) -> dict:
        logits, labels = zip(*(predict(m, loader, amp) for m in self.student.members), strict=True)
        return group_metrics(logits, labels[0])


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

    def _target(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.teacher(x, features=True)[1]["pooled"].float()  # (B, D)
        return (emb - self.target_mean) / self.target_std if self.standardized else emb

    def forward(self, x: torch.Tensor, y: torch.Tensor, **_):
        outputs = self.student.member_outputs(x)
        logits = self.student.head(torch.cat(outputs, 1))  # (B, K)
        terms = self.loss(outputs, self._target(x))
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
def fold_standardization(head: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make ``head`` read z-scored inputs u = (e − mean)/std as it read e: W·e + b = (W·diag(std))·u + (b + W·mean)."""
    head.bias.add_(head.weight @ mean)
    head.weight.mul_(std)


def _num_classes(cfg: Config) -> int:
    return data_utils.DATASETS[cfg.dataset].num_classes


def build_cohort_group(cfg: Config) -> Ensemble:
    """``cfg.members`` students ``cfg.model`` at ``cfg.width``, checked against ``cfg.budget``."""
    group = create_model("ensemble", num_classes=_num_classes(cfg), width=cfg.width, member=cfg.model, k=cfg.members)
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


DML_SOURCE = "Zhang et al. 2018, deep mutual learning: CE + KL to each peer at T = 1, weight 1"
register_method("dml", source=DML_SOURCE, needs_teacher=False, run=mutual_learning, peer_T=1.0, peer_weight=1.0)(None)
register_method(
    "dml+kd",
    source=DML_SOURCE + "; each member's CE replaced by the project's KD recipe",
    run=mutual_learning,
    peer_T=1.0,
    peer_weight=1.0,
    **KD_RECIPE,
)(None)
register_method(
    "partition",
    source="this project: members regress slices of the teacher's pooled embedding (MSE; CE weight 0)",
    needs_features=True,
    reads=("ce_weight", "standardize_targets"),
)(None)
register_method(
    "specialists",
    source="this project: a linear head on frozen partition members",
    needs_features=True,
    reads=("probe_member",),
)(None)


def build_specialists(cfg: Config) -> Specialists:
    """``cfg.members`` specialists for the teacher's embedding (stage 1: head = the teacher's
    classifier, members trainable; stage 2, method "specialists": members frozen, from stage 1)."""
    teacher = load_teacher(cfg.teacher, cfg)
    if not isinstance(teacher.classifier, nn.Linear):
        raise ValueError(
            f"specialists reuse the teacher's linear head on their concatenated outputs, but the teacher at "
            f"{cfg.teacher} has an MLP head (torchvision layout): use a teacher with a linear head (vgg8 ... vgg19)"
        )
    slices = partition(teacher.embed_dim, cfg.members)
    frozen = cfg.method == "specialists"
    group = create_model(
        "specialists",
        num_classes=_num_classes(cfg),
        width=cfg.width,
        member=cfg.model,
        out_dims=[len(s) for s in slices],
        frozen=frozen,
    )
    check_budget(group, cfg.budget, f"{cfg.members} specialists {cfg.model} x{cfg.width:g} and their head")
    if frozen:
        group.load_state_dict(read_checkpoint(cfg.init_from)["model"])
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


def ensemble_configs(cfg: Config, k: int, ensemble_seed: int = 0, shared_stream: bool = False) -> list[Config]:
    """The ``k`` member runs of an ensemble: member m has model seed ``ensemble_seed · k + m`` and its
    own data stream (data seed = model seed), or with ``shared_stream`` the batches, crops and flips
    of data seed ``ensemble_seed``, the stream a mutual-learning cohort of seed ``ensemble_seed``
    sees, which makes such a pair its control. The group is checked against ``cfg.budget``."""
    check_budget(ensemble(_num_classes(cfg), cfg.width, cfg.model, k), cfg.budget, f"{k} x {cfg.model} x{cfg.width:g}")
    seeds = range(ensemble_seed * k, ensemble_seed * k + k)
    return [replace(cfg, members=1, seed=s, data_seed=ensemble_seed if shared_stream else s) for s in seeds]


def train_ensemble(
    cfg: Config, k: int, ensemble_seed: int = 0, shared_stream: bool = False, jobs: int | str = 1
) -> list[RunResult]:
    """``k`` students trained separately with ``cfg.method`` (e.g. "kd", or "ce": independent), as
    ``ensemble_configs`` describes them, ``jobs`` at a time; evaluate them with ``evaluate_group``."""
    return run_all(ensemble_configs(cfg, k, ensemble_seed, shared_stream), jobs=jobs, desc=f"{k} members")


def budget_width(cfg: Config, k: int, method: str = "ensemble") -> float:
    """The widest ``cfg.model`` of which ``k`` fit in ``cfg.budget`` (as an ensemble, or as
    specialists with their head for the teacher ``cfg.teacher``)."""
    n = _num_classes(cfg)
    if method == "specialists":
        dims = [len(s) for s in partition(load_teacher(cfg.teacher, cfg).embed_dim, k)]
        return width_for_budget(lambda w: specialists(n, w, cfg.model, dims), cfg.budget)
    return width_for_budget(lambda w: ensemble(n, w, cfg.model, k), cfg.budget)


# ----------------------------------------------------------------------------- command line

GROUP_METHODS = ("ensemble", "dml", "dml+kd", "specialists")


def run_group(cfg: Config, group: str, head_epochs: int = 10) -> dict:
    """Train (or reuse) the group ``group`` and return its test metrics (``evaluate_group``)."""
    if group == "ensemble":  # members trained separately with --method (ce: independent, kd: distilled)
        models = [r.model for r in train_ensemble(cfg, cfg.members)]
    elif group == "specialists":
        models = [train_specialists(cfg, head_epochs)[1].model]
    else:
        models = mutual_learning(replace(cfg, method=group)).model
    return evaluate_group(models, make_loaders(cfg).test)


def main(argv=None) -> dict:
    parser = build_parser(
        "Train several students: an ensemble of distilled students, a mutual-learning cohort, or "
        "feature-partition specialists; --members K students, --budget N parameters in all."
    )
    parser.add_argument(
        "--group",
        choices=GROUP_METHODS,
        default="dml",
        help="ensemble: --members students trained separately with --method (ce or kd) and averaged; "
        "dml / dml+kd: one cohort trained together; specialists: two stages on the teacher's embedding",
    )
    parser.add_argument("--head-epochs", type=int, default=10, help="specialists: epochs of the head stage")
    args = parser.parse_args(argv)
    group, head_epochs = args.group, args.head_epochs
    del args.group, args.head_epochs
    width_given = hasattr(args, "width")
    try:
        cfg = config_from_args(args)
        method = cfg.method if group == "ensemble" else {"specialists": "partition"}.get(group, group)
        if METHODS.get(method).needs_teacher and not cfg.teacher:
            parser.error(f"--group {group} (method {cfg.method}) needs --teacher RUN_OR_CHECKPOINT")
        if cfg.budget and not width_given:
            cfg = replace(cfg, width=budget_width(cfg, cfg.members, group))
        out = run_group(cfg, group, head_epochs)
    except USAGE_ERRORS as err:
        parser.error(str(err))
    if is_main_process():
        shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}
        print(f"{group}: {cfg.members} x {cfg.model} x{cfg.width:g}", shown)
    return out
