"""The one training/evaluation loop, its config and profiles, and the teacher/baseline CLI.

Anything whose ``forward(x, y)`` returns ``(logits, {term_name: loss})`` trains here: a
plain model (wrapped in ``Vanilla``), a ``train_kd.Distiller``, a cohort of students
(``multi_student``), any later method. The loop sums the terms, logs each of them, evaluates
every epoch (the task's own ``test_metrics`` if it has them) and writes a run folder:

    runs/<name>/config.json     the Config of the run
    runs/<name>/metrics.csv     one row per epoch (train terms, accuracy, test loss/top-1/top-5, lr, wall and CPU time)
    runs/<name>/checkpoint.pt   last epoch: weights, architecture, config, metrics, optimizer state

An interrupted run resumes from its checkpoint; a finished one is reused, not retrained.

    python train_eval.py --profile cpu --model vgg13 --width 0.25 --epochs 15 --subset 0
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import data_utils
from analysis import summarize
from model import (
    Registry,
    create_model,
    load_checkpoint,
    read_checkpoint,
    remove_stale_temporaries,
    resolve_checkpoint,
    save_checkpoint,
    state_digest,
)


@dataclass
class Config:
    """Everything that defines a run. Saved with every result and checkpoint."""

    # run
    profile: str = "cpu"  # the named profile these values started from
    out_dir: str = "runs"  # run folders go here
    name: str = ""  # run folder name; empty: derived from the config (so equal configs share it)
    seed: int = 0  # model initialisation
    data_seed: int = 0  # data stream (order, crops, flips), kept apart from the model seed
    device: str = "auto"  # auto: cuda if available, else cpu
    # data
    dataset: str = "cifar10"  # cifar10 | cifar100
    data_dir: str = "./data"  # holds cifar-10-batches-py/ or cifar-100-python/
    download: bool = False  # fetch the official archive if the data is missing
    synthetic: bool = False  # generate a small learnable dataset in data_dir (tests, demos)
    subset: int = 0  # training images per class (class-balanced, drawn after the hold-out); 0: all of them
    val_size: int = 0  # images held out of the training split for validation (class-balanced); 0: none
    split_seed: int = 0  # which images are held out and which form the subset (apart from model/stream seeds)
    batch_size: int = 128
    crop_pad: int = 4  # random crop after zero padding by this many pixels; 0: off
    flip: bool = True  # random horizontal flip
    # model (the network being trained: teacher, baseline or student)
    model: str = "vgg8"
    width: float = 1.0  # channel multiplier
    # distillation (train_kd.py); method "ce" is plain cross-entropy. Loss weights and T left at
    # None take the method's published recipe (``METHODS[method].recipe``; ``resolve_recipe``).
    method: str = "ce"
    teacher: str = ""  # run folder or checkpoint of the trained teacher
    T: float | None = None  # softmax temperature of the KD term
    ce_weight: float | None = None  # weight of cross-entropy on the labels
    kd_weight: float | None = None  # weight of the T²-scaled KD term
    feat_weight: float | None = None  # β, the weight of a feature method's term (feature_kd.py)
    alpha: float | None = None  # shorthand for ce_weight = 1 - alpha, kd_weight = alpha
    hint_stage: int = 2  # FitNets: the stage whose output is the hint
    warmup: float | None = None  # DKD: epochs over which its distillation terms ramp up linearly
    tckd_weight: float | None = None  # DKD: α, weight of the target-class term
    nckd_weight: float | None = None  # DKD: β, weight of the non-target-class term
    crd_negatives: int | None = None  # CRD: negatives drawn from the memory bank per sample
    crd_dim: int | None = None  # CRD: embedding size of both heads and of the memory bank
    crd_T: float | None = None  # CRD: NCE temperature
    crd_momentum: float | None = None  # CRD: memory-bank update momentum
    init_from: str = ""  # run folder or checkpoint whose weights initialise the model (e.g. FitNets stage 2)
    trust_teacher: bool = False  # distil even from a teacher that is unfinished or scores at chance level
    # optimisation
    epochs: int = 240
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "multistep"  # multistep | cosine | constant
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1  # multistep decay factor
    # the demo's teacher (train_kd.py --demo) and how many seeds experiments repeat
    teacher_model: str = "vgg13"
    teacher_width: float = 1.0
    teacher_epochs: int = 240
    teacher_threads: int = 0  # CPU threads of the demo's teacher run; 0: torch's default
    n_seeds: int = 1
    # several students trained as one run (multi_student.py): deep mutual learning, specialists
    members: int = 1  # students in the run; model and width describe each of them
    peer_T: float | None = None  # temperature of the mutual-learning term (recipe: Zhang et al.'s 1)
    peer_weight: float | None = None  # weight of the mutual-learning term (recipe: 1)
    budget: int = 0  # parameter budget a group of students must fit in; 0: unchecked
    standardize_targets: bool = False  # specialists: regress the teacher's embedding z-scored per dimension
    probe_member: int = -1  # specialists' head stage: a linear probe on this member alone; -1: all members
    # teacher-output reuse (train_kd.py): logits stored once per epoch stream, read back by every student
    teacher_cache: bool = False  # logit-only methods; methods that need teacher features run it online
    cache_dtype: str = "float16"  # float16 | float32 storage of the cached logits
    teacher_amp: str = "off"  # bf16: the frozen teacher's forward under bf16 autocast (the student stays fp32)
    # speed
    channels_last: bool = True  # faster convolutions on CPU (oneDNN) and on CUDA
    amp: str = "auto"  # bf16 autocast: auto (on for CUDA only) | bf16 | off
    compile: bool = False  # torch.compile the training module
    # CPU threads of the run. Results depend on it (reductions split differently), so a sweep fixes
    # it for every run whatever the number of workers; 0: torch's default (all cores).
    threads: int = 0


PROFILES: dict[str, dict] = {
    # seconds: generated data, tiny widths; used by the tests and notebook smoke runs
    "smoke": dict(
        synthetic=True,
        data_dir="./data/synthetic",
        model="vgg8",
        width=0.0625,
        teacher_model="vgg11",
        teacher_width=0.125,
        teacher_epochs=3,
        epochs=2,
        val_size=200,
        batch_size=64,
        nesterov=True,
        schedule="cosine",
        milestones=[],
        n_seeds=1,
    ),
    # this machine: real CIFAR-10, reduced widths, students on a 1000/class subset
    "cpu": dict(
        dataset="cifar10",
        model="vgg8",
        width=0.125,
        teacher_model="vgg13",
        teacher_width=0.25,
        teacher_epochs=30,
        epochs=30,
        subset=1000,
        val_size=5000,  # 500 per class held out: the teacher trains on the other 45,000
        batch_size=128,
        lr=0.05,
        nesterov=True,
        schedule="cosine",
        milestones=[],
        n_seeds=3,
        threads=1,  # students: 1 thread each, 2 at a time on 2 cores (sweeps, the demo)
        teacher_threads=2,
    ),
    # the standard CIFAR-100 KD recipe (Tian et al. 2020): VGG13 -> VGG8, 240 epochs. No validation
    # split: the published numbers it is compared with trained on all 50,000 images.
    "paper": dict(
        dataset="cifar100",
        download=True,
        model="vgg8",
        width=1.0,
        teacher_model="vgg13",
        teacher_width=1.0,
        teacher_epochs=240,
        epochs=240,
        batch_size=64,
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="multistep",
        milestones=[150, 180, 210],
        n_seeds=3,
    ),
}

CHOICES = {
    "dataset": sorted(data_utils.DATASETS),
    "optimizer": ["sgd", "adam"],
    "schedule": ["multistep", "cosine", "constant"],
    "amp": ["auto", "bf16", "off"],
    "cache_dtype": ["float16", "float32"],
    "teacher_amp": ["off", "bf16"],
}


def make_config(profile: str = "cpu", **overrides) -> Config:
    """``Config`` from a named profile plus overrides; unknown names are errors.

    Loss weights and T left unset stay ``None`` here and take the method's published recipe
    when the run starts (``resolve_recipe``), so ``replace(cfg, method=...)`` never carries one
    method's weights into another.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown config field(s) {unknown}; valid fields: {sorted(known)}")
    cfg = Config(profile=profile, **{**PROFILES[profile], **overrides})
    check_config(cfg)
    return cfg


WEIGHTS = ("ce_weight", "kd_weight", "feat_weight", "tckd_weight", "nckd_weight")


def check_config(cfg: Config) -> None:
    """Clear errors for values no run can use, before any data is read."""
    for key, valid in CHOICES.items():
        if getattr(cfg, key) not in valid:
            raise ValueError(f"{key}={getattr(cfg, key)!r} is not valid; choose from {valid}")
    for f in fields(Config):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name}={value} is not a finite number")
    for key in ("epochs", "batch_size", "members"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    for key in ("subset", "val_size", "threads", "teacher_threads", "seed", "data_seed", "split_seed"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    for key in ("width", "teacher_width"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"{key} must be > 0, got {getattr(cfg, key)}")
    if cfg.lr < 0:
        raise ValueError(f"lr must be >= 0, got {cfg.lr}")
    if not 0 <= cfg.momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {cfg.momentum}")
    if not 0 <= cfg.hint_stage < 5:
        raise ValueError(f"hint_stage={cfg.hint_stage}: the VGGs have stages 0-4 (the benchmark's hint is stage 2)")
    if cfg.name and (os.path.basename(cfg.name) != cfg.name or cfg.name in (".", "..") or cfg.name.startswith(".")):
        raise ValueError(f"name={cfg.name!r} must be a plain folder name inside out_dir (no '/', no leading '.')")
    if cfg.alpha is not None and not 0 <= cfg.alpha <= 1:
        raise ValueError(
            f"alpha is the shorthand ce_weight = 1 - alpha, kd_weight = alpha; need 0 <= alpha <= 1, got {cfg.alpha}"
        )
    for key in WEIGHTS:
        if (getattr(cfg, key) or 0) < 0:
            raise ValueError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    for key in ("T", "peer_T", "crd_T", "crd_negatives", "crd_dim"):
        if getattr(cfg, key) is not None and getattr(cfg, key) <= 0:
            raise ValueError(f"{key} must be > 0, got {getattr(cfg, key)}")
    if cfg.warmup is not None and not 0 <= cfg.warmup <= cfg.epochs:
        raise ValueError(f"warmup={cfg.warmup} epochs must be between 0 and the run's {cfg.epochs} epochs")
    if cfg.crd_momentum is not None and not 0 <= cfg.crd_momentum < 1:
        raise ValueError(f"crd_momentum must be in [0, 1), got {cfg.crd_momentum}")
    _check_split(cfg)


def _check_split(cfg: Config) -> None:
    """The hold-out and the subset must fit in every class of the official training split."""
    spec = data_utils.DATASETS[cfg.dataset]
    if cfg.val_size % spec.num_classes:
        raise ValueError(
            f"val_size={cfg.val_size} must be a multiple of the {spec.num_classes} classes of {cfg.dataset} "
            "(the hold-out is class-balanced)"
        )
    per_class = cfg.val_size // spec.num_classes
    if not cfg.synthetic and per_class + cfg.subset > spec.train_per_class:
        raise ValueError(
            f"val_size={cfg.val_size} holds out {per_class} images per class and subset={cfg.subset} asks for "
            f"{cfg.subset} more, but {cfg.dataset} has {spec.train_per_class} per class: "
            f"keep val_size/{spec.num_classes} + subset <= {spec.train_per_class}"
        )


# ----------------------------------------------------------------------------- methods and their recipes


@dataclass(frozen=True)
class Method:
    """A training method as the registry knows it: the single authority on what it needs.

    ``build(cfg, student, teacher, **context)`` returns its loss module; ``context`` offers
    ``train_size`` and ``num_classes`` to builders that name them. ``build`` is None for methods
    whose run function builds the task itself (``ce``, the multi-student groups); ``run(cfg)``
    trains one run of the method (None: ``train_kd.distill``). ``recipe`` holds the Config values
    of its published recipe and ``source`` says where they come from. ``reads`` is every
    method-specific Config field it reads: the others stay out of its runs' identity.
    """

    build: Callable | None
    recipe: dict
    source: str
    needs_teacher: bool
    needs_features: bool  # the teacher's intermediate features: the teacher runs online, no cached logits
    needs_index: bool  # each batch's sample indices (batch extra ``index``)
    reads: frozenset
    run: Callable | None = None
    check: Callable | None = None  # check(cfg) on the resolved config: errors before any data is read


RECIPE_FIELDS = (
    "T",
    *WEIGHTS,
    "peer_T",
    "peer_weight",
    "warmup",
    "crd_negatives",
    "crd_dim",
    "crd_T",
    "crd_momentum",
)
# Config fields that belong to a method; a run's identity keeps only those its method reads.
METHOD_FIELDS = frozenset(
    {
        *RECIPE_FIELDS,
        "teacher",
        "hint_stage",
        "teacher_cache",
        "cache_dtype",
        "teacher_amp",
        "alpha",
        "standardize_targets",
        "probe_member",
    }
)

# Modules that register methods when imported; loaded when a name is not (yet) registered.
METHOD_MODULES = ("train_kd", "feature_kd", "multi_student")


def _load_method_modules() -> None:
    import importlib

    for module in METHOD_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


METHODS = Registry("method", on_miss=_load_method_modules)


def register_method(
    name: str,
    *,
    source: str = "",
    needs_teacher: bool = True,
    needs_features: bool = False,
    needs_index: bool = False,
    reads: tuple[str, ...] = (),
    run: Callable | None = None,
    check: Callable | None = None,
    **recipe,
):
    """Decorator registering ``build(cfg, student, teacher, **context) -> loss`` as method ``name``
    with what it needs and the values of its published recipe, e.g.
    ``@register_method("kd", source="Hinton et al. 2015", T=4.0, ce_weight=0.1, kd_weight=0.9)``."""
    unknown = sorted(set(recipe) - set(RECIPE_FIELDS))
    if unknown:
        raise TypeError(f"recipe field(s) {unknown} of method {name!r}; recipes set {list(RECIPE_FIELDS)}")
    bad = sorted(set(reads) - METHOD_FIELDS)
    if bad:
        raise TypeError(f"reads={bad} of method {name!r} are not method fields; they are {sorted(METHOD_FIELDS)}")
    fields_read = set(recipe) | set(reads)
    if needs_teacher:
        fields_read |= {"teacher", "teacher_amp"}
        if not needs_features:
            fields_read |= {"teacher_cache", "cache_dtype"}  # logits alone can come from the cache

    def add(build):
        entry = Method(build, dict(recipe), source, needs_teacher, needs_features, needs_index, frozenset(fields_read))
        METHODS.register(name)(replace(entry, run=run, check=check))
        return build

    return add


register_method("ce", source="plain cross-entropy on the labels", needs_teacher=False)(None)


def resolve_recipe(cfg: Config) -> Config:
    """``cfg`` with every loss weight and temperature it leaves at None taken from its method's
    published recipe; explicit values stay. ``alpha`` is rewritten as ``ce_weight = 1 - alpha,
    kd_weight = alpha``. Checks that the weights the run uses are not all zero."""
    method = METHODS.get(cfg.method)
    values: dict = {}
    if cfg.alpha is not None:
        if cfg.ce_weight is not None or cfg.kd_weight is not None:
            raise ValueError(
                f"give alpha (={cfg.alpha}) or ce_weight/kd_weight, not both: alpha means "
                "ce_weight = 1 - alpha, kd_weight = alpha"
            )
        values = {"ce_weight": 1 - cfg.alpha, "kd_weight": cfg.alpha, "alpha": None}
    for key, default in method.recipe.items():
        if getattr(cfg, key) is None and key not in values:
            values[key] = default
    out = replace(cfg, **values)
    if method.check:
        method.check(out)
    used = [getattr(out, k) for k in WEIGHTS if k in method.recipe]
    if used and not any(used):
        raise ValueError(
            f"every loss weight of method {cfg.method!r} is zero "
            f"({', '.join(f'{k}={getattr(out, k)}' for k in WEIGHTS if k in method.recipe)}): nothing to train on"
        )
    return out


# ----------------------------------------------------------------------------- command line


def _arg_type(tp):
    if type(None) in typing.get_args(tp):  # ``float | None``: None (the recipe) is the unset option
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    if tp in (int, float, str):
        return dict(type=tp)
    if tp is bool:
        return dict(action=argparse.BooleanOptionalAction)
    if typing.get_origin(tp) is list:
        return dict(type=typing.get_args(tp)[0], nargs="*")
    raise TypeError(f"no command-line form for {tp}")


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """One option per Config field (``--data-dir`` or ``--data_dir``); unset options keep the profile's value."""
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        if f.name == "model":
            flags.append("--student")
        kwargs = _arg_type(hints[f.name])
        if f.name in CHOICES:
            kwargs["choices"] = CHOICES[f.name]
        if f.name == "profile":
            kwargs["choices"] = sorted(PROFILES)
        parser.add_argument(
            *flags,
            dest=f.name,
            help=f"(default from the profile: {f.default!r})" if not isinstance(f.default, list) else None,
            **kwargs,
        )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    values = {f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)}
    return make_config(values.pop("profile", "cpu"), **values)


# ----------------------------------------------------------------------------- run folders

# Fields that do not change what a run computes, so they stay out of its identity.
NOT_IN_IDENTITY = {
    "profile",
    "out_dir",
    "name",
    "device",
    "data_dir",
    "download",
    "n_seeds",
    "teacher_model",
    "teacher_width",
    "teacher_epochs",
    "teacher_threads",
    "budget",
    "trust_teacher",  # the teacher's weights are in the identity
}


def run_identity(cfg: Config) -> dict:
    """The fields that decide what a run computes; those at their class default are left out,
    so adding a field (whose default keeps the old behaviour) leaves earlier runs reusable, and so
    are the method fields its method does not read (``Method.reads``)."""
    cfg = resolve_recipe(cfg)
    defaults = asdict(Config())
    ident = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_IDENTITY and v != defaults[k]}
    unused = set(METHOD_FIELDS - METHODS.get(cfg.method).reads)
    if cfg.schedule != "multistep":
        unused |= {"milestones", "gamma"}
    for key in unused:
        ident.pop(key, None)
    if ident.get("teacher"):  # the teacher's weights, not where they lie: a retrained teacher is a new run
        ident["teacher"] = teacher_digest(cfg.teacher)
    try:
        ident["data"] = data_utils.data_digest(cfg.dataset, cfg.data_dir)
    except FileNotFoundError:
        pass  # no data yet: nothing is trained on this config until it exists (train prepares it first)
    return ident


def teacher_digest(path: str) -> str:
    """Content hash of a teacher checkpoint's weights (the path itself where no file is there yet)."""
    try:
        file = resolve_checkpoint(path)
    except FileNotFoundError:
        return path
    st = os.stat(file)
    return _weights_digest(os.path.abspath(file), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _weights_digest(file: str, size: int, mtime_ns: int) -> str:
    return state_digest(read_checkpoint(file)["model"])[:16]  # any format, in this project's key names


def run_name(cfg: Config) -> str:
    if cfg.name:
        return cfg.name
    digest = hashlib.sha1(json.dumps(run_identity(cfg), sort_keys=True).encode()).hexdigest()[:8]
    group = f"-k{cfg.members}" if cfg.members > 1 else ""
    return f"{cfg.model}-w{cfg.width:g}{group}-{cfg.method}-s{cfg.seed}-{digest}"


def run_dir_for(cfg: Config) -> str:
    return os.path.join(cfg.out_dir, run_name(cfg))


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_history(run_dir: str) -> pd.DataFrame:
    """Per-epoch metrics of a run folder."""
    return pd.read_csv(os.path.join(run_dir, "metrics.csv"))


def load_config(run_dir: str) -> Config:
    with open(os.path.join(run_dir, "config.json")) as f:
        return Config(**json.load(f))


# ----------------------------------------------------------------------------- the loop


class Vanilla(nn.Module):
    """Plain supervised training: ``(logits, {"ce": cross_entropy})``."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, x, y, **_):
        logits = self.student(x)
        return logits, {"ce": F.cross_entropy(logits, y)}


def set_seed(seed: int) -> None:
    """Seed every generator a run may touch (the data stream has its own, see data_utils)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def distributed() -> tuple[int, int]:
    """``(rank, world_size)``; under torchrun, joins the process group on first call."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    return distributed()[0] == 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def amp_enabled(cfg: Config, device: torch.device) -> bool:
    return cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")


def build_optimizer(module: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Only parameters that require gradients: a frozen teacher can never get in."""
    params = [p for p in module.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )


def build_scheduler(optimizer, cfg: Config):
    """Stepped once per epoch."""
    if cfg.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestones, cfg.gamma)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


@torch.no_grad()
def evaluate(model: nn.Module, loader, amp: bool = False) -> dict:
    """Mean cross-entropy, top-1 and top-5 accuracy (%) of a logits-returning model."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss = torch.zeros((), device=device)
    correct = torch.zeros(2, device=device)
    n = 0
    for x, y, *_ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        logits = logits.float()
        loss += F.cross_entropy(logits, y, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hits = top == y[:, None]
        correct += torch.stack([hits[:, 0].sum(), hits.any(1).sum()])
        n += len(y)
    model.train(was_training)
    top1, top5 = (100 * correct / n).tolist()
    return {"loss": loss.item() / n, "top1": top1, "top5": top5}


@torch.no_grad()
def predict(model: nn.Module, loader, amp: bool = False, output=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every logit of a pass over ``loader``: ``(logits (N, K) float32, labels (N,))`` on the CPU.

    ``output(x)``, if given, is collected instead of ``model(x)`` (an embedding, say), with the
    model in eval mode and on its device.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    output = output or model
    logits, labels = [], []
    for x, y, *_ in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits.append(output(x.to(device)).float().cpu())
        labels.append(y.cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def test_metrics(task: nn.Module, loader, amp: bool = False) -> dict:
    """What a run reports each epoch: the task's own ``test_metrics`` if it has one (a cohort
    adds each member's accuracy, say), else ``evaluate`` of its student."""
    if hasattr(task, "test_metrics"):
        return task.test_metrics(loader, amp)
    return evaluate(task.student, loader, amp)


def _as_task(module: nn.Module) -> nn.Module:
    return module if hasattr(module, "student") else Vanilla(module)


def optimizer_step(step, optimizer, x, y, extras: dict | None = None, amp: bool = False):
    """One update: forward (bf16 autocast if ``amp``), sum of the named terms, backward, step.

    ``extras``: the batch's named extras (``teacher_logits``, ``index``...), passed by keyword.
    """
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits, terms = step(x, y, **(extras or {}))
    loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits, terms, loss


def train_one_epoch(task, step, loader, optimizer, device, amp: bool) -> dict:
    """One pass; per-step values stay on the device (no host sync) until the epoch ends."""
    task.train()
    sums: dict[str, torch.Tensor] = {}
    correct = torch.zeros((), device=device)
    n, t0 = 0, time.perf_counter()
    for x, y, *rest in loader:  # rest: the batch's named extras, e.g. cached teacher logits, sample indices
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        extras = {k: v.to(device, non_blocking=True) for k, v in (rest[0] if rest else {}).items()}
        logits, terms, loss = optimizer_step(step, optimizer, x, y, extras, amp=amp)
        for name, value in {"loss": loss, **terms}.items():
            sums[name] = sums.get(name, 0) + value.detach().float() * len(y)
        correct += (logits.argmax(1) == y).sum()
        n += len(y)
    if n == 0:
        raise ValueError("the training loader yielded no batch; lower batch_size or use more data")
    names = list(sums)
    totals = _sum_over_ranks(torch.stack([*(sums[k] for k in names), correct.float(), torch.tensor(float(n))]))
    n = totals[-1].item()
    seconds = time.perf_counter() - t0
    row = {f"train_{k}": (v / n).item() for k, v in zip(names, totals, strict=False)}
    row["train_top1"] = 100 * totals[-2].item() / n
    row["train_images_per_s"] = n / seconds  # all processes together
    return row


def _average_buffers(module: nn.Module) -> None:
    """Average BN running statistics over ranks: DDP syncs them only at the start of a forward,
    so each rank's last batch leaves them slightly different."""
    world = distributed()[1]
    if world == 1:
        return
    import torch.distributed as dist

    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(world)


def _barrier() -> None:
    if distributed()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def _sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    if distributed()[1] == 1:
        return values
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values)
    return values


def _resume(task, optimizer, scheduler, run_dir: str, cfg: Config) -> tuple[int, list]:
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        return 0, []
    ckpt = read_checkpoint(path)
    saved = ckpt.get("config") or {}
    if run_identity(Config(**saved)) != run_identity(cfg):
        raise RuntimeError(f"{run_dir} holds a run with a different config; pick another --name or delete the folder")
    state = ckpt["train_state"]
    task.load_state_dict(state["task"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return ckpt["epoch"], list(ckpt["metrics"] or [])


def _check_finite(row: dict, epoch: int, history: list) -> None:
    """Stop before a diverged epoch overwrites the last good checkpoint."""
    if not math.isfinite(row["train_loss"]):
        kept = f"the checkpoint of epoch {len(history)} is kept" if history else "nothing was saved"
        raise FloatingPointError(
            f"training diverged in epoch {epoch + 1} (train loss {row['train_loss']}); {kept}. "
            "Lower the learning rate (--lr) or the loss weights and start again."
        )


def _save(task, optimizer, scheduler, run_dir, cfg, history, epoch) -> None:
    atomic_write_text(os.path.join(run_dir, "metrics.csv"), pd.DataFrame(history).to_csv(index=False))
    train_state = {
        "task": task.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }
    save_checkpoint(
        os.path.join(run_dir, "checkpoint.pt"),
        task.student,
        config=cfg,
        metrics=history,
        epoch=epoch,
        train_state=train_state,
    )


def _wrap_for_training(task: nn.Module, device: torch.device, cfg: Config, world: int) -> nn.Module:
    """What the loop calls: the task itself, or DDP around it (several processes), compiled or not."""
    step = task
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step = DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(step) if cfg.compile else step


def _progress(total: int, desc: str, initial: int):
    """One bar per run, in epochs; KD_PROGRESS=0 (or a non-zero rank) turns it off."""
    if os.environ.get("KD_PROGRESS", "1") == "0" or not is_main_process():
        from tqdm import tqdm  # the plain class: tqdm.auto would warn about notebook widgets

        return tqdm(total=total, disable=True)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, initial=initial, unit="epoch", leave=True)


# The columns of a history that differ between two runs of one config: how long, not what, it trained.
TIMING_COLUMNS = ["seconds", "cpu_seconds", "train_images_per_s"]


def fit(
    module: nn.Module,
    train_loader,
    test_loader,
    cfg: Config,
    run_dir: str | None = None,
    callbacks: tuple[Callable[[int, dict], None], ...] = (),
    val_loader=None,
) -> pd.DataFrame:
    """Train ``module`` for ``cfg.epochs``; returns the per-epoch history.

    ``module``: a model returning logits (trained with cross-entropy) or anything with a
    ``.student`` whose ``forward(x, y)`` returns ``(logits, {term: loss})``; if it has a
    ``test_metrics(loader, amp)`` method, that gives the epoch's ``val_*``/``test_*`` columns.
    With ``val_loader`` every epoch is also evaluated on the held-out validation images (the
    ``val_*`` columns every choice is made on). With ``run_dir`` every epoch is checkpointed and
    an earlier, unfinished run there is resumed. ``callbacks`` are called as ``cb(epoch, row)``
    after each epoch's checkpoint.
    """
    device = resolve_device(cfg.device)
    task = _as_task(module)
    if getattr(task, "needs_index", False) and not getattr(train_loader, "with_index", False):
        raise ValueError(
            "this method needs each batch's sample indices (e.g. CRD's memory bank), but the training loader "
            "yields none: build it with CifarLoader(..., with_index=True)"
        )
    world = distributed()[1]
    if world > 1 and device.type == "cuda":  # SyncBatchNorm has no CPU kernels
        task = nn.SyncBatchNorm.convert_sync_batchnorm(task)
    task.to(device)
    if cfg.channels_last:
        task.to(memory_format=torch.channels_last)
    amp = amp_enabled(cfg, device)
    optimizer = build_optimizer(task, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    start, history = 0, []
    if run_dir:
        start, history = _resume(task, optimizer, scheduler, run_dir, cfg)  # refuses another config's folder first
        if is_main_process():
            os.makedirs(run_dir, exist_ok=True)
            remove_stale_temporaries(run_dir)
            atomic_write_text(os.path.join(run_dir, "config.json"), json.dumps(asdict(cfg), indent=2))
    step = _wrap_for_training(task, device, cfg, world)
    bar = _progress(cfg.epochs, run_name(cfg) if run_dir else "train", start)
    for epoch in range(start, cfg.epochs):
        t0, cpu0 = time.perf_counter(), time.process_time()
        train_loader.set_epoch(epoch)
        if hasattr(task, "set_epoch"):  # e.g. a loss with a warm-up (DKD)
            task.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        row = {"epoch": epoch + 1, "lr": lr}
        row.update(train_one_epoch(task, step, train_loader, optimizer, device, amp))
        _average_buffers(task)
        if val_loader is not None:
            row.update({f"val_{k}": v for k, v in test_metrics(task, val_loader, amp).items()})
        test = test_metrics(task, test_loader, amp)
        row.update({f"test_{k}": v for k, v in test.items()})
        row["seconds"] = time.perf_counter() - t0
        # CPU time of all this process's threads: unlike ``seconds``, it barely grows while other jobs
        # share the cores (about +12% at three jobs per core)
        row["cpu_seconds"] = time.process_time() - cpu0
        row["threads"] = torch.get_num_threads() if device.type == "cpu" else 0
        _check_finite(row, epoch, history)
        scheduler.step()
        history.append(row)
        if run_dir and is_main_process():  # one writer; every rank holds the same weights
            _save(task, optimizer, scheduler, run_dir, cfg, history, epoch + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", **{k: f"{row[k]:.2f}" for k in ("val_top1",) if k in row})
        for cb in callbacks:
            cb(epoch, row)
    bar.close()
    _barrier()  # the last checkpoint exists for every process once fit returns
    return pd.DataFrame(history)


# ----------------------------------------------------------------------------- whole runs


@dataclass
class RunResult:
    model: nn.Module  # the trained network (student), on the CPU
    history: pd.DataFrame
    run_dir: str
    config: Config


def prepare_data(cfg: Config) -> None:
    """Make sure the dataset exists (generate the synthetic one, or download if allowed)."""
    spec = data_utils.DATASETS[cfg.dataset]
    if cfg.synthetic and not os.path.isdir(os.path.join(cfg.data_dir, spec.folder)):
        data_utils.write_synthetic_cifar(cfg.data_dir, cfg.dataset, n_train=2000, n_test=500)
    elif cfg.download:
        data_utils.download_cifar(cfg.dataset, cfg.data_dir)
    if not cfg.synthetic and data_utils.is_generated(cfg.dataset, cfg.data_dir):
        raise ValueError(
            f"{data_utils.find_dataset_dir(cfg.dataset, cfg.data_dir)} holds generated data (marked "
            f"{data_utils.GENERATED_MARK}), not {cfg.dataset}: point --data-dir at the real data, or pass "
            "--synthetic (the smoke profile does) to train on generated data on purpose"
        )


@contextlib.contextmanager
def run_lock(run_dir: str):
    """Hold an exclusive lock on a run folder (one process at a time trains or checks it)."""
    if distributed()[1] > 1:  # every rank trains the same run together
        yield
        return
    import fcntl

    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare(cfg: Config) -> None:
    if is_main_process():
        prepare_data(cfg)
    _barrier()


def make_loaders(cfg: Config) -> data_utils.CifarLoaders:
    """``(train, val, test)``: training loader (this process's shard under torchrun), the held-out
    validation images (None when ``cfg.val_size`` is 0) and the whole test set."""
    rank, world = distributed()
    _prepare(cfg)
    device = resolve_device(cfg.device)
    return data_utils.get_cifar_loaders(
        cfg.dataset,
        cfg.batch_size,
        cfg.data_dir,
        device=device,
        subset_per_class=cfg.subset or None,
        val_size=cfg.val_size,
        split_seed=cfg.split_seed,
        aug={"crop_pad": cfg.crop_pad, "flip": cfg.flip},
        seed=cfg.data_seed,
        channels_last=cfg.channels_last,
        num_shards=world,
        shard=rank,
    )


def finished_run(run_dir: str, cfg: Config) -> RunResult | None:
    """The stored result if ``run_dir`` holds this config, trained to the end."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        return None
    model, ckpt = load_checkpoint(path)
    if ckpt.get("epoch") != cfg.epochs or run_identity(Config(**ckpt["config"])) != run_identity(cfg):
        return None
    return RunResult(model, pd.DataFrame(ckpt["metrics"]), run_dir, cfg)


def build_student(cfg: Config) -> nn.Module:
    """The network a run trains: ``cfg.model`` at ``cfg.width``, from ``cfg.init_from`` if set."""
    num_classes = data_utils.DATASETS[cfg.dataset].num_classes
    student = create_model(cfg.model, num_classes=num_classes, width=cfg.width)
    if cfg.init_from:
        student.load_state_dict(read_checkpoint(cfg.init_from)["model"])
    return student


def train(
    cfg: Config,
    make_task: Callable[[Config, nn.Module, object], nn.Module] | None = None,
    wrap_loader: Callable[[nn.Module, object, Config], object] | None = None,
    make_student: Callable[[Config], nn.Module] = build_student,
) -> RunResult:
    """Train (or reuse, or resume) the run ``cfg`` describes.

    ``make_task(cfg, student, train_loader)`` wraps the freshly built student for the loop (a
    Distiller, say; the loader tells it the training-set size); plain cross-entropy training when
    it is None. The loader yields sample indices (batch extra ``index``) when the method needs
    them. ``wrap_loader(task, loader, cfg)`` may replace the training stream (e.g. to add cached
    teacher outputs to each batch).
    ``make_student(cfg)`` builds what is trained and checkpointed (a group of students, say).
    Loss weights and T left at None take the method's recipe first (``resolve_recipe``); the
    result's ``config`` is the resolved one, as saved in the run folder.
    """
    cfg = resolve_recipe(cfg)
    _prepare(cfg)  # the data is part of the run's identity
    run_dir = run_dir_for(cfg)
    with run_lock(run_dir):  # the same run started twice: the second waits, then reuses the first's result
        done = finished_run(run_dir, cfg)
        if done is not None:
            return done
        return _train(cfg, run_dir, make_task, wrap_loader, make_student)


def _train(cfg, run_dir, make_task, wrap_loader, make_student) -> RunResult:
    with thread_count(cfg.threads):
        loaders = make_loaders(cfg)  # draws from its own generators, not the model seed
        loaders.train.with_index = METHODS.get(cfg.method).needs_index
        set_seed(cfg.seed)
        student = make_student(cfg)
        task = make_task(cfg, student, loaders.train) if make_task else Vanilla(student)
        train_loader = wrap_loader(task, loaders.train, cfg) if wrap_loader else loaders.train
        history = fit(task, train_loader, loaders.test, cfg, run_dir, val_loader=loaders.val)
    return RunResult(task.student.cpu(), history, run_dir, cfg)


@contextlib.contextmanager
def thread_count(threads: int):
    """Run the body with ``threads`` CPU threads (0: leave torch's setting), then restore it."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def print_result(result: RunResult) -> None:
    if not is_main_process():
        return
    print(f"\nrun folder: {result.run_dir}")
    print(pd.DataFrame([summarize(result.history)]).round(2).to_string(index=False))


# The library's own errors: on the command line they are usage errors (a message, exit 2), not tracebacks.
USAGE_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FloatingPointError)


def main(argv=None) -> RunResult:
    parser = build_parser("Train a teacher or an independent (cross-entropy) student.")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        if METHODS.get(cfg.method).build is not None or METHODS.get(cfg.method).run is not None:
            parser.error(f"train_eval.py trains with cross-entropy only; use train_kd.py for --method {cfg.method}")
        result = train(cfg)
    except USAGE_ERRORS as err:
        parser.error(str(err))
    print_result(result)
    return result


if __name__ == "__main__":
    # run the importable module's main, so one registry and one Config class serve every module
    import train_eval

    train_eval.main(sys.argv[1:])
