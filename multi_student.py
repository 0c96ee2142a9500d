"""Several students instead of one: ensembles, deep mutual learning, feature-partition specialists,
class-subset specialists.

Every variant trains in the one loop of ``train_eval``; what differs is the network being
trained (a group of students, checkpointed and rebuilt like any model) and the task around it.
The group methods are ordinary registered methods, one file each: ``methods/dml.py`` (``dml``,
``dml+kd``) and ``methods/specialists.py`` (``partition``, ``specialists``); this module holds
what is about groups as such (budgets, ensembles of separate runs, their evaluation) and the CLI.

    members = train_ensemble(cfg, k=4)                    # 4 students trained separately (cfg.method)
    cohort = mutual_learning(replace(cfg, members=2))     # 2 students trained together (DML)
    stage1, final = train_specialists(replace(cfg, members=4, teacher=...))
    evaluate_group([r.model for r in members], test_loader, teacher_logits)
    group = train_class_specialists(replace(cfg, method="kd"), k=2, size=2)   # Hinton et al.'s specialists
    evaluate_class_specialists(group, val_loader)          # generalist alone vs the paper's combination

A group's total parameter count can be held under ``cfg.budget``: ``width_for_budget`` finds
the widest members that fit and every group run checks it when it builds its students.

    python multi_student.py --profile cpu --group dml --members 2 --budget 247050
    python multi_student.py --profile cpu --group ensemble --method kd --members 4 --budget 247050 --teacher runs/<t>
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

import data_utils
from analysis import group_metrics
from config import Config, build_parser, config_from_args, run_cli
from distiller import load_teacher
from distributed import init_distributed, is_main_process
from evaluation import predict
from methods.class_specialists import collapse, combine, confusable_groups
from methods.dml import Cohort, MutualLearningLoss, build_cohort, build_cohort_group, mutual_learning
from methods.specialists import (
    PartitionLoss,
    PartitionRegression,
    build_specialists,
    embedding_stats,
    fold_standardization,
    head_config,
    head_stage,
    partition,
    partition_stage,
    train_probes,
    train_specialists,
)
from model import Ensemble, check_budget, count_flops, count_params, ensemble, specialists, width_for_budget
from registry import METHODS, group_methods
from runs import RunResult, make_loaders
from sweeps import run_all

__all__ = [
    "ClassSpecialists",
    "Cohort",
    "MutualLearningLoss",
    "PartitionLoss",
    "PartitionRegression",
    "budget_width",
    "build_cohort",
    "build_cohort_group",
    "build_specialists",
    "check_budget",
    "class_specialist_configs",
    "embedding_stats",
    "ensemble",
    "ensemble_configs",
    "evaluate_class_specialists",
    "evaluate_group",
    "fold_standardization",
    "head_config",
    "head_stage",
    "main",
    "mutual_learning",
    "partition",
    "partition_stage",
    "run_group",
    "specialists",
    "teacher_groups",
    "train_class_specialists",
    "train_ensemble",
    "train_probes",
    "train_specialists",
    "width_for_budget",
]

# ``--group ensemble``: --members students trained separately with --method, averaged. Every other
# group is a registered method with a group runner (``registry.group_methods``).
ENSEMBLE = "ensemble"
# ``--group class_specialists``: a generalist trained with --method, and --members class-subset specialists
CLASS_SPECIALISTS = "class_specialists"
SEPARATE = (ENSEMBLE, CLASS_SPECIALISTS)  # groups of ordinary runs, trained with --method


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


def ensemble_configs(cfg: Config, k: int, ensemble_seed: int = 0, shared_stream: bool = False) -> list[Config]:
    """The ``k`` member runs of an ensemble: member m has model seed ``ensemble_seed · k + m`` and its
    own data stream (data seed = model seed), or with ``shared_stream`` the batches, crops and flips
    of data seed ``ensemble_seed``, the stream a mutual-learning cohort of seed ``ensemble_seed``
    sees, which makes such a pair its control. The group is checked against ``cfg.budget``."""
    group = ensemble(data_utils.DATASETS[cfg.dataset].num_classes, cfg.width, cfg.model, k)
    check_budget(group, cfg.budget, f"{k} x {cfg.model} x{cfg.width:g}")
    seeds = range(ensemble_seed * k, ensemble_seed * k + k)
    return [replace(cfg, members=1, seed=s, data_seed=ensemble_seed if shared_stream else s) for s in seeds]


def train_ensemble(
    cfg: Config, k: int, ensemble_seed: int = 0, shared_stream: bool = False, jobs: int | str = 1
) -> list[RunResult]:
    """``k`` students trained separately with ``cfg.method`` (e.g. "kd", or "ce": independent), as
    ``ensemble_configs`` describes them, ``jobs`` at a time; evaluate them with ``evaluate_group``."""
    return run_all(ensemble_configs(cfg, k, ensemble_seed, shared_stream), jobs=jobs, desc=f"{k} members")


def budget_width(cfg: Config, k: int, method: str = ENSEMBLE) -> float:
    """The widest ``cfg.model`` of which ``k`` fit in ``cfg.budget``, as the group ``method`` builds
    them (its ``Method.group_model``; an ensemble of ``k`` networks for ``ensemble``)."""
    n = data_utils.DATASETS[cfg.dataset].num_classes
    if method != ENSEMBLE and METHODS.get(method).group_model is not None:
        return width_for_budget(lambda w: METHODS[method].group_model(cfg, k, w), cfg.budget)
    return width_for_budget(lambda w: ensemble(n, w, cfg.model, k), cfg.budget)


# ----------------------------------------------------------------------------- class-subset specialists


@dataclass
class ClassSpecialists:
    """Hinton et al.'s group: the generalist, the class groups, one specialist run per group."""

    generalist: RunResult
    groups: list[list[int]]
    specialists: list[RunResult]


def teacher_groups(cfg: Config, k: int, size: int) -> list[list[int]]:
    """The ``k`` groups of ``size`` classes the teacher ``cfg.teacher`` confuses most on the students'
    training images (unaugmented; no label is read), by ``confusable_groups``."""
    teacher = load_teacher(cfg.teacher, cfg)
    logits = predict(teacher, data_utils.unaugmented(make_loaders(cfg).train))[0]  # (N, C)
    return confusable_groups(logits.softmax(1), k, size)


def class_specialist_configs(cfg: Config, generalist_dir: str, groups, epochs: int | None = None) -> list[Config]:
    """One ``class_specialist`` run per group, each from the generalist's weights (the paper's start)."""
    return [
        replace(
            cfg,
            method="class_specialist",
            special_classes=",".join(map(str, g)),
            init_from=generalist_dir,
            epochs=epochs or cfg.epochs,
        )
        for g in groups
    ]


def train_class_specialists(
    cfg: Config, k: int, size: int, specialist_epochs: int | None = None, jobs: int | str = 1
) -> ClassSpecialists:
    """Hinton et al. 2015's specialists at one width: the generalist (``cfg``: its method, e.g. kd),
    the teacher's ``k`` most-confused groups of ``size`` classes, and a specialist per group started
    from the generalist (``specialist_epochs``, default ``cfg.epochs``). For a parameter budget,
    give ``cfg.width = budget_width(cfg, k + 1)``: the k + 1 networks are an ensemble's."""
    check_budget(
        ensemble(data_utils.DATASETS[cfg.dataset].num_classes, cfg.width, cfg.model, k + 1),
        cfg.budget,
        f"a generalist and {k} specialists, {cfg.model} x{cfg.width:g}",
    )
    generalist = run_all([replace(cfg, budget=0)], jobs=1)[0]
    groups = teacher_groups(cfg, k, size)
    specialists = run_all(
        class_specialist_configs(replace(cfg, budget=0), generalist.run_dir, groups, specialist_epochs), jobs=jobs
    )
    return ClassSpecialists(generalist, groups, specialists)


def evaluate_class_specialists(group: ClassSpecialists, loader, top_n: int = 1, amp: bool = False) -> dict:
    """Top-1 of the generalist alone and of the paper's combination (``combine``) on ``loader``,
    the share of images with an active specialist, and the networks' parameters."""
    z_g, labels = predict(group.generalist.model, loader, amp)  # (N, C), (N,)
    p_special = [
        collapse(predict(s.model, loader, amp)[0].log_softmax(1), g).exp()  # (N, |S| + 1)
        for s, g in zip(group.specialists, group.groups, strict=True)
    ]
    p_g = z_g.softmax(1)
    q = combine(p_g, p_special, group.groups, top_n)  # (N, C)
    top = p_g.topk(top_n, 1).indices  # (N, n)
    active = torch.isin(top, torch.tensor([c for g in group.groups for c in g])).any(1)
    models = [group.generalist.model, *(s.model for s in group.specialists)]
    return {
        "generalist_top1": 100 * (p_g.argmax(1) == labels).float().mean().item(),
        "combined_top1": 100 * (q.argmax(1) == labels).float().mean().item(),
        "active_share": 100 * active.float().mean().item(),
        "params": sum(count_params(m) for m in models),
    }


# ----------------------------------------------------------------------------- command line


def run_group(cfg: Config, group: str, head_epochs: int = 10, group_size: int = 2) -> dict:
    """Train (or reuse) the group ``group`` and return its test metrics (``evaluate_group``; for
    class specialists ``evaluate_class_specialists``, ``cfg.members`` groups of ``group_size`` classes)."""
    if group == CLASS_SPECIALISTS:
        found = train_class_specialists(cfg, cfg.members, group_size, jobs=1)
        return {"groups": found.groups, **evaluate_class_specialists(found, make_loaders(cfg).test)}
    if group == ENSEMBLE:  # members trained separately with --method (ce: independent, kd: distilled)
        models = [r.model for r in train_ensemble(cfg, cfg.members)]
    else:
        models = METHODS.get(group).group(replace(cfg, method=group), head_epochs=head_epochs)
    return evaluate_group(models, make_loaders(cfg).test)


def main(argv=None) -> dict:
    init_distributed()
    parser = build_parser(
        "Train several students: an ensemble of distilled students, a mutual-learning cohort, or "
        "feature-partition specialists; --members K students, --budget N parameters in all.",
        argv,
    )
    group = parser.add_argument_group("group")
    group.add_argument(
        "--group",
        choices=[*SEPARATE, *group_methods()],
        default="dml",
        help="ensemble: --members students trained separately with --method (ce or kd) and averaged; "
        "dml / dml+kd: one cohort trained together; specialists: two stages on the teacher's embedding; "
        "class_specialists: a generalist (--method) and --members specialists on the teacher's most-confused "
        "classes, combined by Hinton et al.'s rule",
    )
    group.add_argument("--head-epochs", type=int, default=10, help="specialists: epochs of the head stage")
    group.add_argument("--group-size", type=int, default=2, help="class_specialists: classes per specialist")

    from distiller import check_run_folder
    from sweeps import RunsFailed

    def body(args) -> tuple[str, Config, dict]:
        width_given = hasattr(args, "width")
        cfg = config_from_args(args)
        method = cfg.method if args.group in SEPARATE else args.group
        teacher_needed = METHODS.get(method).needs_teacher or args.group == CLASS_SPECIALISTS
        if teacher_needed and not cfg.teacher:
            raise ValueError(f"--group {args.group} (method {method}) needs --teacher RUN_OR_CHECKPOINT")
        several = {ENSEMBLE: cfg.members > 1, "specialists": True, CLASS_SPECIALISTS: True}
        if cfg.name and several.get(args.group, False):
            raise ValueError(
                f"argument --name: --group {args.group} trains several runs, each in a folder named for its "
                f"config; drop --name {cfg.name}"
            )
        networks = cfg.members + 1 if args.group == CLASS_SPECIALISTS else cfg.members  # + the generalist
        if cfg.budget and not width_given:
            group = ENSEMBLE if args.group in SEPARATE else args.group
            cfg = replace(cfg, width=budget_width(cfg, networks, group))
        # a named run whose folder holds another config's run: refused before anything is written
        check_run_folder(ensemble_configs(cfg, 1)[0] if args.group in SEPARATE else replace(cfg, method=args.group))
        try:
            return args.group, cfg, run_group(cfg, args.group, args.head_epochs, args.group_size)
        except RunsFailed as err:  # failed members: a message (their folders keep what was saved)
            raise ValueError(str(err)) from err

    name, cfg, out = run_cli(parser, body, argv)
    if is_main_process():
        shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}
        print(f"{name}: {cfg.members} x {cfg.model} x{cfg.width:g}", shown)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
