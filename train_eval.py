"""The one training/evaluation loop, its config and profiles, and the teacher/baseline CLI.

Anything whose ``forward(x, y)`` returns ``(logits, {term_name: loss})`` trains here: a
plain model (wrapped in ``Vanilla``), a ``train_kd.Distiller``, a cohort of students
(``multi_student``), any later method. The loop sums the terms, logs each of them, evaluates
every epoch (the task's own ``test_metrics`` if it has them) and writes a run folder:

    runs/<name>/config.json     the Config of the run
    runs/<name>/metrics.csv     one row per epoch (train terms, accuracy, test loss/top-1/top-5, lr, time)
    runs/<name>/checkpoint.pt   last epoch: weights, architecture, config, metrics, optimizer state

An interrupted run resumes from its checkpoint; a finished one is reused, not retrained.

    python train_eval.py --profile cpu --model vgg13 --width 0.25 --epochs 15 --subset 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import data_utils
from model import (
    create_model,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
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
    subset: int = 0  # training images per class (class-balanced); 0: the whole split
    batch_size: int = 128
    crop_pad: int = 4  # random crop after zero padding by this many pixels; 0: off
    flip: bool = True  # random horizontal flip
    # model (the network being trained: teacher, baseline or student)
    model: str = "vgg8"
    width: float = 1.0  # channel multiplier
    # distillation (train_kd.py); method "ce" is plain cross-entropy
    method: str = "ce"
    teacher: str = ""  # run folder or checkpoint of the trained teacher
    T: float = 4.0  # softmax temperature of the KD term
    alpha: float = 0.9  # weight of the KD term; cross-entropy gets 1 - alpha
    feat_weight: float = 0.0  # β of a feature method (feature_kd.py); 0: the benchmark's value
    hint_stage: int = 2  # FitNets: the stage whose output is the hint
    init_from: str = ""  # run folder or checkpoint whose weights initialise the model (e.g. FitNets stage 2)
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
    n_seeds: int = 1
    # several students trained as one run (multi_student.py): deep mutual learning, specialists
    members: int = 1  # students in the run; model and width describe each of them
    peer_T: float = 1.0  # temperature of the mutual-learning term (Zhang et al. use 1)
    peer_weight: float = 1.0  # weight of the mutual-learning term
    budget: int = 0  # parameter budget a group of students must fit in; 0: unchecked
    # teacher-output reuse (train_kd.py): logits stored once per epoch stream, read back by every student
    teacher_cache: bool = False  # logit-only methods; methods that need teacher features run it online
    cache_dtype: str = "float16"  # float16 | float32 storage of the cached logits
    # speed
    channels_last: bool = True  # faster convolutions on CPU (oneDNN) and on CUDA
    amp: str = "auto"  # bf16 autocast: auto (on for CUDA only) | bf16 | off
    compile: bool = False  # torch.compile the training module


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
        batch_size=128,
        lr=0.05,
        nesterov=True,
        schedule="cosine",
        milestones=[],
        n_seeds=3,
    ),
    # the standard CIFAR-100 KD recipe (Tian et al. 2020): VGG13 -> VGG8, 240 epochs
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
        T=4.0,
        alpha=0.9,
        n_seeds=3,
    ),
}

CHOICES = {
    "dataset": sorted(data_utils.DATASETS),
    "optimizer": ["sgd", "adam"],
    "schedule": ["multistep", "cosine", "constant"],
    "amp": ["auto", "bf16", "off"],
    "cache_dtype": ["float16", "float32"],
}


def make_config(profile: str = "cpu", **overrides) -> Config:
    """``Config`` from a named profile plus overrides; unknown names are errors."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown config field(s) {unknown}; valid fields: {sorted(known)}")
    cfg = Config(profile=profile, **{**PROFILES[profile], **overrides})
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    for key, valid in CHOICES.items():
        if getattr(cfg, key) not in valid:
            raise ValueError(f"{key}={getattr(cfg, key)!r} is not valid; choose from {valid}")
    for key in ("epochs", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if not 0 <= cfg.alpha <= 1:
        raise ValueError(f"alpha weighs KD against cross-entropy and must be in [0, 1], got {cfg.alpha}")
    if cfg.T <= 0 or cfg.peer_T <= 0:
        raise ValueError(f"temperatures must be > 0, got T={cfg.T}, peer_T={cfg.peer_T}")
    if cfg.members < 1:
        raise ValueError(f"members counts the students of a run and must be >= 1, got {cfg.members}")


# ----------------------------------------------------------------------------- command line


def _arg_type(tp):
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
    "budget",
}


# Methods that never read the teacher: its fields do not change what they compute.
TEACHERLESS = ("ce", "dml")


def run_identity(cfg: Config) -> dict:
    """The fields that decide what a run computes; those at their class default are left out,
    so adding a field (whose default keeps the old behaviour) leaves earlier runs reusable."""
    defaults = asdict(Config())
    ident = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_IDENTITY and v != defaults[k]}
    unused = ("teacher", "T", "alpha", "feat_weight", "hint_stage", "teacher_cache", "cache_dtype")
    unused = unused if cfg.method in TEACHERLESS else ()
    if cfg.schedule != "multistep":
        unused += ("milestones", "gamma")
    if not cfg.method.startswith("dml"):
        unused += ("peer_T", "peer_weight")
    for key in unused:
        ident.pop(key, None)
    return ident


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

    def forward(self, x, y, *extra):
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
    for x, y in loader:
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


def top1_agreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """Percentage of samples on which two models predict the same class."""
    return 100 * (logits_a.argmax(1) == logits_b.argmax(1)).float().mean().item()


def per_sample_kl(logits_s: torch.Tensor, logits_t: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """KL(softmax(z_t/T) ‖ softmax(z_s/T)) of every sample, (N,)."""
    log_p_s = F.log_softmax(logits_s.double() / T, dim=1)  # (N, K)
    log_p_t = F.log_softmax(logits_t.double() / T, dim=1)  # (N, K)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).float()


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each row of ``a`` with the same row of ``b``, (N,).

    Ranks by double argsort (ties broken by position, where scipy averages them; exact float
    ties between logits are rare), then the Pearson correlation of the ranks, all vectorised.
    """
    ra = a.argsort(dim=1).argsort(dim=1).double()  # (N, K) ranks 0..K-1
    rb = b.argsort(dim=1).argsort(dim=1).double()
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return ((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))).float()


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE (%): Σ_b |B_b|/N · |accuracy(B_b) - confidence(B_b)| over equal-width confidence bins."""
    conf, pred = logits.float().softmax(1).max(1)
    correct = (pred == labels).float()
    bins = (conf * n_bins).long().clamp(max=n_bins - 1)  # (N,) bin of each sample
    count = torch.bincount(bins, minlength=n_bins).float()
    gap = torch.bincount(bins, weights=correct - conf, minlength=n_bins).abs()  # |Σ (acc - conf)| per bin
    return 100 * (gap.sum() / count.sum()).item()


def test_metrics(task: nn.Module, loader, amp: bool = False) -> dict:
    """What a run reports each epoch: the task's own ``test_metrics`` if it has one (a cohort
    adds each member's accuracy, say), else ``evaluate`` of its student."""
    if hasattr(task, "test_metrics"):
        return task.test_metrics(loader, amp)
    return evaluate(task.student, loader, amp)


def _as_task(module: nn.Module) -> nn.Module:
    return module if hasattr(module, "student") else Vanilla(module)


def optimizer_step(step, optimizer, x, y, *extra, amp: bool = False):
    """One update: forward (bf16 autocast if ``amp``), sum of the named terms, backward, step."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits, terms = step(x, y, *extra)
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
    for x, y, *extra in loader:  # extra: e.g. cached teacher logits for these exact views
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        extra = [e.to(device, non_blocking=True) for e in extra]
        logits, terms, loss = optimizer_step(step, optimizer, x, y, *extra, amp=amp)
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


def fit(
    module: nn.Module,
    train_loader,
    test_loader,
    cfg: Config,
    run_dir: str | None = None,
    callbacks: tuple[Callable[[int, dict], None], ...] = (),
) -> pd.DataFrame:
    """Train ``module`` for ``cfg.epochs``; returns the per-epoch history.

    ``module``: a model returning logits (trained with cross-entropy) or anything with a
    ``.student`` whose ``forward(x, y)`` returns ``(logits, {term: loss})``; if it has a
    ``test_metrics(loader, amp)`` method, that gives the epoch's ``test_*`` columns. With ``run_dir``
    every epoch is checkpointed and an earlier, unfinished run there is resumed.
    ``callbacks`` are called as ``cb(epoch, row)`` after each epoch's checkpoint.
    """
    device = resolve_device(cfg.device)
    task = _as_task(module)
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
        if is_main_process():
            os.makedirs(run_dir, exist_ok=True)
            atomic_write_text(os.path.join(run_dir, "config.json"), json.dumps(asdict(cfg), indent=2))
        start, history = _resume(task, optimizer, scheduler, run_dir, cfg)
    step = _wrap_for_training(task, device, cfg, world)
    bar = _progress(cfg.epochs, run_name(cfg) if run_dir else "train", start)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        train_loader.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        row = {"epoch": epoch + 1, "lr": lr}
        row.update(train_one_epoch(task, step, train_loader, optimizer, device, amp))
        _average_buffers(task)
        test = test_metrics(task, test_loader, amp)
        row.update({f"test_{k}": v for k, v in test.items()})
        row["seconds"] = time.perf_counter() - t0
        scheduler.step()
        history.append(row)
        if run_dir and is_main_process():  # one writer; every rank holds the same weights
            _save(task, optimizer, scheduler, run_dir, cfg, history, epoch + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", test_top1=f"{row['test_top1']:.2f}")
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


def make_loaders(cfg: Config):
    """Training loader (this process's shard under torchrun) and the whole test set."""
    rank, world = distributed()
    if is_main_process():
        prepare_data(cfg)
    _barrier()
    device = resolve_device(cfg.device)
    return data_utils.get_cifar_loaders(
        cfg.dataset,
        cfg.batch_size,
        cfg.data_dir,
        device=device,
        subset_per_class=cfg.subset or None,
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
    make_task: Callable[[Config, nn.Module], nn.Module] | None = None,
    wrap_loader: Callable[[nn.Module, object, Config], object] | None = None,
    make_student: Callable[[Config], nn.Module] = build_student,
) -> RunResult:
    """Train (or reuse, or resume) the run ``cfg`` describes.

    ``make_task(cfg, student)`` wraps the freshly built student for the loop (a Distiller,
    say); plain cross-entropy training when it is None. ``wrap_loader(task, loader, cfg)``
    may replace the training stream (e.g. to add cached teacher outputs to each batch).
    ``make_student(cfg)`` builds what is trained and checkpointed (a group of students, say).
    """
    run_dir = run_dir_for(cfg)
    done = finished_run(run_dir, cfg)
    if done is not None:
        return done
    set_seed(cfg.seed)
    student = make_student(cfg)
    task = make_task(cfg, student) if make_task else Vanilla(student)
    train_loader, test_loader = make_loaders(cfg)  # draws from its own generators, not the seed above
    if wrap_loader:
        train_loader = wrap_loader(task, train_loader, cfg)
    history = fit(task, train_loader, test_loader, cfg, run_dir)
    return RunResult(task.student.cpu(), history, run_dir, cfg)


def summarize(history: pd.DataFrame) -> dict:
    """Last- and best-epoch test accuracy of one run."""
    best = history.loc[history["test_top1"].idxmax()]
    last = history.iloc[-1]
    return {
        "last_top1": last["test_top1"],
        "last_top5": last["test_top5"],
        "best_top1": best["test_top1"],
        "best_top5": history["test_top5"].max(),
        "best_epoch": int(best["epoch"]),
        "train_seconds": history["seconds"].sum(),
    }


ACCURACY_COLUMNS = ("last_top1", "last_top5", "best_top1", "best_top5")


def summarize_seeds(results: list[RunResult]) -> dict:
    """Mean and sample std over seeds of each accuracy in ``summarize``, and the mean minutes."""
    stats = pd.DataFrame([summarize(r.history) for r in results])
    out: dict = {"seeds": len(results)}
    for col in ACCURACY_COLUMNS:
        out[col] = stats[col].mean()
        out[f"{col}_std"] = stats[col].std(ddof=1) if len(results) > 1 else float("nan")
    out["minutes"] = stats["train_seconds"].mean() / 60
    return out


def mean_std_table(groups: dict[str, list[RunResult]], columns=ACCURACY_COLUMNS) -> pd.DataFrame:
    """One row per group, each accuracy as "mean ± std" over its seeds (for display)."""
    rows = {}
    for name, results in groups.items():
        s = summarize_seeds(results)
        rows[name] = {"seeds": s["seeds"], **{c: f"{s[c]:.2f} ± {s[c + '_std']:.2f}" for c in columns}}
    return pd.DataFrame.from_dict(rows, orient="index")


def plot_seeds(ax, results: list[RunResult], column: str, label: str | None = None, **style):
    """Mean over seeds of one per-epoch metric, with a ±1 std band; returns the line."""
    values = pd.concat([r.history.set_index("epoch")[column] for r in results], axis=1)
    mean, std = values.mean(axis=1), values.std(axis=1).fillna(0)
    (line,) = ax.plot(mean.index, mean, label=label, **style)
    ax.fill_between(mean.index, mean - std, mean + std, alpha=0.2, color=line.get_color())
    return line


def print_result(result: RunResult) -> None:
    if not is_main_process():
        return
    print(f"\nrun folder: {result.run_dir}")
    print(pd.DataFrame([summarize(result.history)]).round(2).to_string(index=False))


def main(argv=None) -> RunResult:
    parser = build_parser("Train a teacher or an independent (cross-entropy) student.")
    cfg = config_from_args(parser.parse_args(argv))
    if cfg.method != "ce":
        parser.error(f"train_eval.py trains with cross-entropy only; use train_kd.py for --method {cfg.method}")
    result = train(cfg)
    print_result(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
