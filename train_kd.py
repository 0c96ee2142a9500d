"""Logit distillation: the KD loss, the frozen-teacher Distiller, the method registry, the CLI.

    python train_kd.py --teacher runs/<teacher-run> --student vgg8 --method kd --T 4 --alpha 0.9
    python train_kd.py --demo --profile cpu --data-dir ./data     # teacher vs independent vs KD

A method is a loss module called as ``loss(logits_s, logits_t, target, s_feats=..., t_feats=...)``
that returns named terms; ``register_method`` adds one without touching the training loop.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import os
import statistics
import sys
import time
import typing
import weakref
from dataclasses import dataclass, fields, replace

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import data_utils
from analysis import cell_table, compare, plot_seeds, standardize, summarize, summarize_seeds
from model import count_flops, count_params, create_model, load_checkpoint
from teacher_cache import use_teacher_cache
from train_eval import (
    METHODS,
    USAGE_ERRORS,
    Config,
    RunResult,
    Vanilla,
    amp_enabled,
    atomic_write_text,
    build_optimizer,
    build_parser,
    check_config,
    config_from_args,
    distributed,
    evaluate,
    is_main_process,
    make_config,
    make_loaders,
    optimizer_step,
    print_result,
    register_method,
    resolve_device,
    resolve_recipe,
    run_dir_for,
    run_identity,
    run_name,
    thread_count,
    train,
)

if __name__ == "__main__":
    # Run as the importable module, then stop: the methods below register into the shared
    # registry once, as `train_kd`, never a second time as `__main__`.
    import train_kd

    train_kd.main(sys.argv[1:])
    sys.exit(0)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits (autocast) to fp32: softmax at high T needs the mantissa; fp64 stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, T: float) -> torch.Tensor:
    """T² · (1/B) Σ_b KL(softmax(z_t/T) ‖ softmax(z_s/T)): Hinton et al. 2015's soft-target term.

    The T² keeps the gradient scale independent of T (soft-target gradients shrink as 1/T²).
    """
    log_p_s = F.log_softmax(upcast(logits_s) / T, dim=1)  # (B, K)
    log_p_t = F.log_softmax(upcast(logits_t) / T, dim=1)  # (B, K)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T * T


class KDLoss(nn.Module):
    """Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".

    L = w_ce · CE(z_s, y) + w_kd · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), batch mean.
    Returns the weighted terms ``{"ce": w_ce·CE, "kd": w_kd·T²·KL}``; their sum is L. The
    weights are free (mdistiller's convention), not tied to sum to 1. The CIFAR-100 benchmark
    recipe is w_ce = 0.1, w_kd = 0.9, T = 4 (RepDistiller, mdistiller).
    """

    needs_features = False

    def __init__(self, T: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9):
        super().__init__()
        if T <= 0 or ce_weight < 0 or kd_weight < 0:
            raise ValueError(f"need T > 0 and weights >= 0, got T={T}, ce_weight={ce_weight}, kd_weight={kd_weight}")
        self.T, self.ce_weight, self.kd_weight = T, ce_weight, kd_weight

    def match(self, logits_s: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
        """The unweighted soft-target term, T²·KL."""
        return kd_loss(logits_s, logits_t, self.T)

    def forward(self, logits_s, logits_t, target, **_) -> dict[str, torch.Tensor]:
        return {
            "ce": self.ce_weight * F.cross_entropy(logits_s, target),
            "kd": self.kd_weight * self.match(logits_s, logits_t),
        }


class LogitStandardKDLoss(KDLoss):
    """Sun et al., CVPR 2024, "Logit Standardization in Knowledge Distillation".

    L = w_ce · CE(z_s, y) + w_kd · τ² · KL(softmax(z̃_t/τ) ‖ softmax(z̃_s/τ)),
    z̃ = (z - mean_k z) / (std_k z + ε) per sample. The student need only match the teacher's
    logit *relations*, not their scale or shift: in effect a per-sample temperature τ·σ(z).
    Cross-entropy stays on the raw logits. The released recipe is w_ce = 0.1, w_kd = 9, τ = 2
    (base temperature; their VGG13→VGG8 log uses τ = 3).
    """

    def __init__(self, T: float = 2.0, ce_weight: float = 0.1, kd_weight: float = 9.0):
        super().__init__(T, ce_weight, kd_weight)

    def match(self, logits_s: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
        return kd_loss(standardize(logits_s), standardize(logits_t), self.T)


def dkd_terms(
    logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, T: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample TCKD and NCKD (Zhao et al. 2022), both with the T² factor, each (B,).

    TCKD = T²·KL(b_t ‖ b_s), b = (p_target, 1 − p_target) of softmax(z/T);
    NCKD = T²·KL(p̂_t ‖ p̂_s), p̂ = softmax(z/T) over the non-target classes only.
    KD = TCKD + (1 − p_t,target)·NCKD for every sample: the classical loss couples the two.
    """
    zs, zt = upcast(logits_s) / T, upcast(logits_t) / T  # (B, K)
    is_target = F.one_hot(target, zs.shape[1]).bool()  # (B, K)

    def parts(z):
        log_all = torch.logsumexp(z, dim=1)  # (B,)
        non_target = z.masked_fill(is_target, float("-inf"))  # (B, K)
        log_b = torch.stack([z[is_target] - log_all, torch.logsumexp(non_target, 1) - log_all], 1)  # (B, 2)
        return log_b, F.log_softmax(non_target, dim=1)  # log p̂: -inf at the target

    log_b_s, log_hat_s = parts(zs)
    log_b_t, log_hat_t = parts(zt)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(1)
    nckd = (log_hat_t.exp() * (log_hat_t - log_hat_s)).masked_fill(is_target, 0.0).sum(1)
    return tckd * T * T, nckd * T * T


@torch.no_grad()
def kd_decomposition(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, T: float = 4.0) -> dict:
    """Means over samples of Hinton's T²·KL and its DKD parts: KD = TCKD + (1 − p_t,target)·NCKD."""
    tckd, nckd = dkd_terms(logits_s, logits_t, target, T)  # (N,), (N,)
    weight = 1 - (upcast(logits_t) / T).softmax(1).gather(1, target[:, None]).squeeze(1)  # (N,)
    return {
        "kd": kd_loss(logits_s, logits_t, T).item(),
        "tckd": tckd.mean().item(),
        "nckd": nckd.mean().item(),
        "teacher_1-p_target": weight.mean().item(),
        "weighted_nckd": (weight * nckd).mean().item(),
    }


class DKDLoss(nn.Module):
    """Decoupled KD (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation").

    L = w_ce · CE + min((epoch + 1) / warm-up, 1) · (α · TCKD + β · NCKD), batch means of
    ``dkd_terms``. Classical KD weighs NCKD by the teacher's 1 − p_target, so the better the
    teacher is on a sample the less its dark knowledge counts; DKD weighs it by a free β.
    Released recipe (mdistiller ``configs/cifar100/dkd/vgg13_vgg8.yaml`` on ``engine/cfg.py``):
    w_ce = 1, α = 1, β = 6 for VGG13→VGG8 (8 elsewhere), T = 4, 20 warm-up epochs of 240.
    """

    def __init__(self, T: float = 4.0, ce_weight: float = 1.0, alpha: float = 1.0, beta: float = 6.0, warmup=20):
        super().__init__()
        self.T, self.ce_weight, self.alpha, self.beta, self.warmup = T, ce_weight, alpha, beta, warmup
        self.ramp = 1.0 if not warmup else 1 / warmup

    def set_epoch(self, epoch: int) -> None:
        self.ramp = 1.0 if not self.warmup else min((epoch + 1) / self.warmup, 1.0)

    def forward(self, logits_s, logits_t, target, **_) -> dict[str, torch.Tensor]:
        tckd, nckd = dkd_terms(logits_s, logits_t, target, self.T)
        return {
            "ce": self.ce_weight * F.cross_entropy(logits_s, target),
            "tckd": self.ramp * self.alpha * tckd.mean(),
            "nckd": self.ramp * self.beta * nckd.mean(),
        }


class FrozenTeacher(nn.Module):
    """A teacher that cannot train: always in eval mode, no gradients, invisible to optimizers.

    The network is held outside the module tree, so it is absent from ``parameters()``,
    ``state_dict()``, any optimizer and DistributedDataParallel, while ``.to()`` and
    ``.cuda()`` still move it. Every forward re-asserts eval mode, so even a ``.train()``
    called on the network itself cannot make its batch-norm statistics drift.
    """

    def __init__(self, net: nn.Module, bf16: bool = False):
        super().__init__()
        net.requires_grad_(False)
        self._hidden = (net.eval(),)  # a tuple is not registered as a submodule
        self.bf16 = bf16  # forward under bf16 autocast, outputs handed on in fp32

    @property
    def net(self) -> nn.Module:
        return self._hidden[0]

    def _apply(self, fn, recurse=True):
        self.net._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor, features: bool = False):
        self.net.train(False)
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.net(x, features=True) if features else self.net(x)
        return _to_float(out) if self.bf16 else out


def _to_float(out):
    """bf16 outputs (a tensor, or logits with a features dict of tensors and lists of them) as fp32."""
    if isinstance(out, torch.Tensor):
        return out.float()
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_float(v) for k, v in out.items()}
    return out


class Distiller(nn.Module):
    """Student + frozen teacher + loss, in the loop's form: ``forward(x, y) -> (logits, terms)``.

    Trainable modules of the loss (adapters, regressors) are submodules here, so they reach
    the optimizer and checkpoints with the student; the teacher reaches neither.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: nn.Module, teacher_bf16: bool = False):
        super().__init__()
        self.student = student
        self.teacher = FrozenTeacher(teacher, bf16=teacher_bf16)
        self.loss = loss

    @property
    def needs_features(self) -> bool:
        return getattr(self.loss, "needs_features", False)

    @property
    def needs_index(self) -> bool:
        return getattr(self.loss, "needs_index", False)

    def set_epoch(self, epoch: int) -> None:
        """The loop's epoch (0-based), for losses that change with it (a warm-up, say)."""
        if hasattr(self.loss, "set_epoch"):
            self.loss.set_epoch(epoch)

    def forward(self, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None = None, **extras):
        """``teacher_logits``: the teacher's outputs for exactly these views, if cached; other
        named batch extras (``index``...) go to the loss by keyword."""
        if self.needs_features:
            logits_s, feats_s = self.student(x, features=True)
            logits_t, feats_t = self.teacher(x, features=True)
        else:
            logits_s, feats_s = self.student(x), None
            logits_t = teacher_logits if teacher_logits is not None else self.teacher(x)
            feats_t = None
        terms = self.loss(logits_s, logits_t, y, s_feats=feats_s, t_feats=feats_t, **extras)
        return logits_s, terms


# ----------------------------------------------------------------------------- methods

# The registry lives with the loop (train_eval.METHODS) so that run identities can read every
# method's recipe; ``register_method`` adds one with its published defaults and their source.
list_methods = METHODS.names

KD_RECIPE = dict(T=4.0, ce_weight=0.1, kd_weight=0.9)
KD_SOURCE = "Hinton et al. 2015; CIFAR-100 recipe of RepDistiller (-r 0.1 -a 0.9, kd_T 4) and mdistiller (KD.yaml)"


@register_method("kd", source=KD_SOURCE, **KD_RECIPE)
def _build_kd(cfg: Config, student: nn.Module, teacher: nn.Module, **_) -> nn.Module:
    return KDLoss(cfg.T, cfg.ce_weight, cfg.kd_weight)


@register_method(
    "kd_ls",
    source="Sun et al. 2024, released code (README and mdistiller/engine/cfg.py): --logit-stand --base-temp 2 "
    "--kd-weight 9, CE 0.1",
    T=2.0,
    ce_weight=0.1,
    kd_weight=9.0,
)
def _build_kd_ls(cfg: Config, student: nn.Module, teacher: nn.Module, **_) -> nn.Module:
    return LogitStandardKDLoss(cfg.T, cfg.ce_weight, cfg.kd_weight)


def _check_dkd(cfg: Config) -> None:
    if cfg.warmup > cfg.epochs:
        raise ValueError(
            f"DKD's warm-up ({cfg.warmup:g} epochs) is longer than the run ({cfg.epochs} epochs): the distillation "
            f"terms would never reach full weight. The release uses 20 of 240 epochs; scale it, e.g. "
            f"--warmup {cfg.epochs * 20 / 240:g}"
        )


@register_method(
    "dkd",
    source="Zhao et al. 2022; mdistiller configs/cifar100/dkd/vgg13_vgg8.yaml (BETA 6) on engine/cfg.py "
    "(CE 1, ALPHA 1, T 4, WARMUP 20 of 240 epochs)",
    check=_check_dkd,
    T=4.0,
    ce_weight=1.0,
    tckd_weight=1.0,
    nckd_weight=6.0,
    warmup=20.0,
)
def _build_dkd(cfg: Config, student: nn.Module, teacher: nn.Module, **_) -> nn.Module:
    return DKDLoss(cfg.T, cfg.ce_weight, cfg.tckd_weight, cfg.nckd_weight, cfg.warmup)


def load_teacher(path: str, cfg: Config) -> nn.Module:
    """The teacher network from a run folder or checkpoint, checked against the run's dataset."""
    if not path:
        raise ValueError("distillation needs a teacher: pass --teacher runs/<teacher-run> (or a checkpoint)")
    teacher, ckpt = load_checkpoint(path)
    num_classes = data_utils.DATASETS[cfg.dataset].num_classes
    if teacher.num_classes != num_classes:
        raise ValueError(f"teacher at {path} has {teacher.num_classes} classes but {cfg.dataset} has {num_classes}")
    planned = (ckpt.get("config") or {}).get("epochs")
    if planned and ckpt.get("epoch") is not None and ckpt["epoch"] < planned and not cfg.trust_teacher:
        raise ValueError(
            f"the teacher at {path} stopped at epoch {ckpt['epoch']} of {planned}: finish it (rerun its command; "
            "it resumes) or pass --trust-teacher to distil from it as it is"
        )
    return teacher


def build_distiller(cfg: Config, student: nn.Module, train_loader=None) -> Distiller:
    """The loop's task for a distillation method: student, frozen teacher and the method's loss,
    sized by the training set that ``train_loader`` holds (CRD's memory bank, say)."""
    teacher = load_teacher(cfg.teacher, cfg)
    context = {"num_classes": teacher.num_classes}
    if train_loader is not None:
        context["train_size"] = len(getattr(train_loader, "loader", train_loader).images)
    loss = get_method(cfg.method)(cfg, student, teacher, **context)
    return Distiller(student, teacher, loss, teacher_bf16=cfg.teacher_amp == "bf16")


def get_method(name: str):
    """The loss builder ``build(cfg, student, teacher, **context)`` of a distillation method; it
    fills the config's unset weights from the method's recipe and passes the context keys
    (``train_size``, ``num_classes``) that the builder names."""
    build = METHODS.get(name).build
    if build is None:
        raise ValueError(f"method {name!r} has no distillation loss; distillation methods: {', '.join(loss_methods())}")
    params = inspect.signature(build).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())

    def built(cfg, student, teacher, **context):
        if context.get("train_size") is None and "train_size" in params:
            raise ValueError(f"method {name!r} is sized by the training set: pass train_size=len(training images)")
        context = context if takes_all else {k: v for k, v in context.items() if k in params}
        return build(resolve_recipe(cfg), student, teacher, **context)

    return built


def loss_methods() -> list[str]:
    return [name for name in METHODS.names() if METHODS[name].build is not None]


def verify_teacher(cfg: Config) -> dict:
    """The teacher's validation and test accuracy, measured the first time it is used on this data
    (``<out_dir>/teacher_checks/<teacher>-<data>.json``), printed, and refused at chance level
    unless ``cfg.trust_teacher``."""
    ident = run_identity(cfg)
    path = os.path.join(cfg.out_dir, "teacher_checks", f"{ident['teacher']}-{ident.get('data', 'nodata')}.json")
    if os.path.isfile(path):
        with open(path) as f:
            check = json.load(f)
    else:
        teacher = load_teacher(cfg.teacher, cfg)
        loaders = make_loaders(cfg)
        check = {"teacher": cfg.teacher, "test_top1": evaluate(teacher, loaders.test)["top1"]}
        if loaders.val is not None:
            check["val_top1"] = evaluate(teacher, loaders.val)["top1"]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, json.dumps(check, indent=2))
        if is_main_process():
            shown = ", ".join(f"{k} {v:.2f}%" for k, v in check.items() if k != "teacher")
            print(f"teacher {cfg.teacher}: {shown}")
    chance = 100 / data_utils.DATASETS[cfg.dataset].num_classes
    if check["test_top1"] < 2 * chance and not cfg.trust_teacher:
        raise ValueError(
            f"the teacher at {cfg.teacher} scores {check['test_top1']:.2f}% on the test set, near chance "
            f"({chance:.0f}%): is it the right file, trained on this data set? Pass --trust-teacher to use it anyway"
        )
    return check


def distill(cfg: Config) -> RunResult:
    """Train (or reuse) the run ``cfg`` describes: a student distilled with ``cfg.method``, or any
    registered method through its own run function (``ce``: plain training; ``dml``: a cohort)."""
    method = METHODS.get(cfg.method)  # a bad name fails before any data is read
    if method.build is None and method.run is None:
        return train(cfg)  # ce
    if method.build is None:
        return method.run(cfg)
    check_method_inputs(cfg)
    verify_teacher(cfg)
    return train(cfg, make_task=build_distiller, wrap_loader=use_teacher_cache if cfg.teacher_cache else None)


def check_method_inputs(cfg: Config) -> None:
    """Start-up errors for what the method needs and the config cannot give."""
    method = METHODS.get(cfg.method)
    resolve_recipe(cfg)
    if method.needs_teacher and not cfg.teacher:
        raise ValueError(f"method {cfg.method!r} needs a teacher: pass --teacher RUN_OR_CHECKPOINT (teacher=...)")
    if cfg.teacher_cache and method.needs_features:
        raise ValueError(
            f"method {cfg.method!r} needs the teacher's features, not only its logits; teacher-output reuse "
            "(--teacher-cache) stores logits: drop it (the teacher then runs online)"
        )
    if cfg.teacher_cache and cfg.teacher_amp == "bf16":
        raise ValueError(
            "--teacher-amp bf16 speeds up a teacher that runs every step; with --teacher-cache it runs once per "
            "view and its stored logits are what the student sees: drop one of the two"
        )
    if method.needs_index and distributed()[1] > 1:
        raise ValueError(f"method {cfg.method!r} keeps a per-sample memory bank, which this loop does not shard")


# ----------------------------------------------------------------------------- cost of a method


class TensorMemory(TorchDispatchMode):
    """Bytes of the tensors that the ops run under it allocate: ``current`` and ``peak``.

    Every op's outputs are counted once per storage (views share their base's) and released when
    the storage is freed, so ``peak`` is the most memory that activations, saved tensors,
    gradients and temporaries held at once. Storages that existed before (parameters, optimizer
    state, the batch) are seen but not counted. Unlike the process's resident set, this separates
    methods whose differences are a few MB beside the data and the framework, and it works on any
    device.
    """

    def __init__(self):
        super().__init__()
        self._live: dict[int, int] = {}  # storage address -> bytes counted for it
        self.current = self.peak = 0

    def _see(self, t: torch.Tensor, count: bool) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._live or key == 0:
            return
        size = storage.nbytes() if count else 0
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                self._see(t, count=False)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t, count=True)
        return out


def state_bytes(task: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of everything a run keeps between steps: parameters and buffers of the task (student,
    adapters, memory banks), of a frozen teacher (held outside the module tree) and the optimizer
    state; shared storages counted once."""
    tensors = list(task.parameters()) + list(task.buffers())
    for module in task.modules():
        if isinstance(module, FrozenTeacher):
            tensors += list(module.net.parameters()) + list(module.net.buffers())
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _cost_worker(cfg: Config, steps: int, queue) -> None:
    with thread_count(cfg.threads):  # the run's own thread count: a cost is per run, as the runs go
        queue.put(_cost(cfg, steps))


def _cost(cfg: Config, steps: int) -> dict:
    train_loader = make_loaders(cfg).train
    train_loader.with_index = METHODS.get(cfg.method).needs_index
    num_classes = data_utils.DATASETS[cfg.dataset].num_classes
    student = create_model(cfg.model, num_classes=num_classes, width=cfg.width)
    distills = METHODS.get(cfg.method).build is not None
    task = build_distiller(cfg, student, train_loader) if distills else Vanilla(student)
    if distills and cfg.teacher_cache:  # the stored logits replace the teacher's forward, as in ``distill``
        train_loader = use_teacher_cache(task, train_loader, cfg)
    device = resolve_device(cfg.device)
    task.to(device).train()
    if cfg.channels_last:
        task.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(task, cfg)
    batches = iter(train_loader)
    amp = amp_enabled(cfg, device)

    def step():
        optimizer_step(task, optimizer, *next(batches), amp=amp)  # (x, y) or (x, y, extras)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):  # warm-up: allocator, oneDNN kernels, optimizer state, the epoch's cached logits
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)  # robust to a step that another process delayed
    with TensorMemory() as memory:  # one more step, not timed: the accounting slows each op
        step()
    state = state_bytes(task, optimizer)
    return {
        "seconds_per_step": seconds,
        "images_per_s": cfg.batch_size / seconds,
        "state_mb": state / 2**20,
        "step_peak_mb": memory.peak / 2**20,
        "peak_memory_mb": (state + memory.peak) / 2**20,
        "extra_params": count_params(task.loss) if distills else 0,
    }


def measure_cost(cfg: Config, steps: int = 20) -> dict:
    """Seconds per training step, images/s and the memory of the run ``cfg`` describes.

    Measured in a fresh process at the run's ``cfg.threads``, reading the teacher's stored logits
    where ``cfg.teacher_cache`` says the run would: the median of ``steps`` timed steps after 2
    warm-up steps, then one step under ``TensorMemory``. ``state_mb``: what the run keeps between
    steps (``state_bytes``: student, adapters, teacher, memory banks, optimizer state);
    ``step_peak_mb``: the most that one step's activations, gradients and temporaries hold at
    once; ``peak_memory_mb`` their sum. Tensor bytes, not the process's resident set (which the
    data and the framework dominate); ``extra_params`` counts trained adapters.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cost_worker, args=(cfg, steps, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


# ----------------------------------------------------------------------------- many runs: sweeps


def default_jobs(threads: int) -> int:
    """Worker processes that fill this machine's cores at ``threads`` threads each (0: torch's
    default, which takes every core, so one worker: two would oversubscribe the cores, and
    OpenMP threads waiting for a descheduled peer slow each run many times over)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // (threads or cores))


def _run_in_worker(run, cfg: Config) -> dict:
    """One run in a worker process: no per-epoch bars (the sweep shows one bar over runs)."""
    os.environ["KD_PROGRESS"] = "0"
    result = run(cfg)
    return {"run_dir": result.run_dir, "history": result.history}


def run_many(configs: list[Config], jobs: int | str = "auto", run=None, desc: str = "runs") -> list[dict]:
    """Run every config (each an ordinary run folder: finished ones are reused, unfinished resumed).

    ``jobs`` worker processes (``spawn``; ``"auto"``: cores // threads per run) share the work;
    with 1 the runs go one after the other in this process. Each run uses its own
    ``cfg.threads``, so its numbers do not depend on ``jobs``. Returns, in the order of
    ``configs``, ``{"run_dir", "history"}`` or ``{"error"}`` for a run that failed; the others
    still finish. ``run`` (default ``distill``) must be importable by name (a module-level function).
    """
    run = run or distill
    jobs = default_jobs(max(c.threads for c in configs) if configs else 1) if jobs == "auto" else jobs
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a whole number >= 1 or 'auto', got {jobs!r}")
    from tqdm.auto import tqdm

    out: list[dict] = [{} for _ in configs]
    bar = tqdm(total=len(configs), desc=desc, unit="run", disable=os.environ.get("KD_PROGRESS", "1") == "0")
    if jobs == 1 or len(configs) <= 1:
        for i, cfg in enumerate(configs):
            out[i] = _guarded(run, cfg)
            bar.update(1)
        bar.close()
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_run_in_worker, run, cfg): i for i, cfg in enumerate(configs)}
        for future in as_completed(futures):
            i = futures[future]
            try:
                out[i] = future.result()
            except Exception as err:  # a crashed worker (BrokenProcessPool) lands here too
                out[i] = {"error": f"{type(err).__name__}: {err}"}
            bar.update(1)
    bar.close()
    return out


def run_all(configs: list[Config], jobs: int | str = "auto", desc: str = "runs") -> list[RunResult]:
    """``run_many``, then every result read back (``RunResult``, in order); raises if a run failed."""
    done = run_many(configs, jobs=jobs, desc=desc)
    failed = [f"{run_name(c)}: {d['error']}" for c, d in zip(configs, done, strict=True) if "error" in d]
    if failed:
        raise RuntimeError(f"{len(failed)} runs failed (rerun to redo only those):\n  " + "\n  ".join(failed))
    return [distill(c) for c in configs]  # finished: read back, not retrained


def run_seeds(cfg: Config, seeds, jobs: int | str = "auto") -> list[RunResult]:
    """``cfg`` once per seed (model and data-stream seed together, so groups pair by seed), in parallel."""
    return run_all([replace(cfg, seed=s, data_seed=s) for s in seeds], jobs, desc=f"{cfg.method} x{len(seeds)}")


def _guarded(run, cfg: Config) -> dict:
    try:
        return _run_in_worker(run, cfg)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}


def expand_grid(cfg: Config, grid: dict[str, list], seeds) -> list[tuple[dict, int, Config]]:
    """Every (cell, seed, config) of a grid, checked before anything runs.

    A cell sets the grid's Config fields; a seed sets ``seed`` and ``data_seed`` together, so
    two cells with the same seed are paired (same initialisation, same data stream).
    """
    known = sorted(f.name for f in fields(Config))
    if not grid or any(len(list(v)) == 0 for v in grid.values()):
        raise ValueError(f"empty grid {grid!r}: give each swept field at least one value, e.g. {{'T': [1, 2, 4]}}")
    for key in grid:
        if key not in known:
            raise ValueError(f"grid key {key!r} is not a Config field; valid fields: {', '.join(known)}")
        if key in ("seed", "data_seed"):
            raise ValueError("seeds are not a grid field: pass seeds=... (each seed sets seed and data_seed)")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("no seeds: pass seeds=range(3) or similar")
    keys = list(grid)
    out = []
    for values in itertools.product(*(list(grid[k]) for k in keys)):
        cell = dict(zip(keys, values, strict=True))
        for seed in seeds:
            run_cfg = replace(cfg, **cell, seed=seed, data_seed=seed, name="", threads=cfg.threads or 1)
            check_config(run_cfg)
            out.append((cell, seed, resolve_recipe(run_cfg)))
    return out


def sweep(
    cfg: Config,
    grid: dict[str, list],
    seeds=range(3),
    jobs: int | str = "auto",
    best_by: str = "val_top1",
    run=None,
) -> pd.DataFrame:
    """Train every cell of ``grid`` × ``seeds`` (in parallel) and return one row per run.

    Rows carry the cell's values, the seed, the run folder, last-epoch ``val_top1``/``val_loss``
    and ``test_top1``/``test_top5``, and the epoch of best validation accuracy with the test
    accuracy there. The cell whose mean ``best_by`` over seeds is highest is marked in column
    ``best`` and in ``df.attrs["best"]``; choose on validation columns, report test for that cell.
    Runs without ``threads`` set use 1 thread each. Failed runs are reported together at the
    end (their folders keep what was saved); run the same sweep again to redo only those.
    Each run is an ordinary, independent command, so a cluster can take them instead
    (``python train_kd.py --sweep ... --jobs 1`` per array task, or ``run_many`` under submitit).
    """
    runs = expand_grid(cfg, grid, seeds)
    done = run_many([c for _, _, c in runs], jobs=jobs, run=run, desc="sweep")
    rows, failed = [], []
    for (cell, seed, run_cfg), res in zip(runs, done, strict=True):
        row = {**cell, "seed": seed, "threads": run_cfg.threads}
        if "error" in res:
            failed.append(f"{run_name(run_cfg)}: {res['error']}")
            rows.append({**row, "run_dir": run_dir_for(run_cfg), "error": res["error"]})
            continue
        rows.append({**row, "run_dir": res["run_dir"], **_sweep_metrics(res["history"])})
    df = pd.DataFrame(rows)
    _write_sweep(cfg, grid, df)
    if failed:
        err = RuntimeError(
            f"{len(failed)} of {len(runs)} runs failed (the others finished; rerunning the sweep redoes only "
            "the missing ones):\n  " + "\n  ".join(failed)
        )
        err.results = df
        raise err
    return mark_best(df, list(grid), best_by)


def _sweep_metrics(history: pd.DataFrame) -> dict:
    s = summarize(history)
    last = history.iloc[-1]
    return {
        "val_top1": last.get("val_top1", float("nan")),
        "val_loss": last.get("val_loss", float("nan")),
        "test_top1": last["test_top1"],
        "test_top5": last["test_top5"],
        "best_epoch": s["best_epoch"],
        "test_top1_at_best": s["best_top1"],
        "minutes": s["train_seconds"] / 60,
    }


def mark_best(df: pd.DataFrame, keys: list[str], by: str = "val_top1") -> pd.DataFrame:
    """Mark the rows of the cell with the highest mean ``by`` over seeds (``best`` column, ``attrs``)."""
    if by not in df:
        raise ValueError(f"best_by={by!r} is not a column of the sweep; columns: {', '.join(df.columns)}")
    if df[by].isna().all():
        raise ValueError(f"no run has {by!r} (val_size=0 means no validation split to choose on)")
    means = df.groupby(keys, dropna=False)[by].mean()
    best = means.idxmax()
    best = dict(zip(keys, best if isinstance(best, tuple) else (best,), strict=True))
    df = df.copy()
    df["best"] = np.logical_and.reduce([df[k] == v for k, v in best.items()])
    df.attrs["best"] = best
    df.attrs["best_by"] = by
    return df


def _write_sweep(cfg: Config, grid: dict, df: pd.DataFrame) -> None:
    """The sweep's table as data: ``<out_dir>/sweeps/<digest>.csv`` beside the run folders."""
    key = json.dumps({"base": run_name(replace(cfg, name="")), "grid": grid}, sort_keys=True, default=str)
    path = os.path.join(cfg.out_dir, "sweeps", f"sweep-{hashlib.sha1(key.encode()).hexdigest()[:8]}.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, df.to_csv(index=False))
    df.attrs["path"] = path


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["T=1,2,4", "kd_weight=1,3,9"]`` → ``{"T": [1.0, 2.0, 4.0], "kd_weight": [1.0, 3.0, 9.0]}``."""
    hints = typing.get_type_hints(Config)
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values:
            raise ValueError(f"sweep item {item!r} is not FIELD=V1,V2,...")
        if key not in hints:
            raise ValueError(f"grid key {key!r} is not a Config field; valid fields: {', '.join(sorted(hints))}")
        tp = next((t for t in typing.get_args(hints[key]) if t is not type(None)), hints[key])
        cast = (lambda v: v.lower() in ("1", "true", "yes")) if tp is bool else tp
        grid[key] = [cast(v.strip()) for v in values.split(",")]
    return grid


def parse_seeds(text: str) -> list[int]:
    """``"0-2"`` → [0, 1, 2]; ``"0,3,5"`` → [0, 3, 5]."""
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return seeds


# ----------------------------------------------------------------------------- the demo


def teacher_config(cfg: Config) -> Config:
    """The demo's teacher: ``teacher_*`` fields, cross-entropy, the whole training split but
    the validation hold-out (the same images the students hold out)."""
    return replace(
        cfg,
        model=cfg.teacher_model,
        width=cfg.teacher_width,
        epochs=cfg.teacher_epochs,
        threads=cfg.teacher_threads,
        subset=0,
        method="ce",
        teacher="",
        seed=0,
        data_seed=0,
        name="",
    )


@dataclass
class Experiment:
    """What a notebook starts from: its config, seeds, trained teacher and figure folder."""

    cfg: Config
    seeds: range  # sweeps and exploratory groups: 3 (1 in smoke)
    teacher: RunResult
    figures: str
    confirm_seeds: range = range(5)  # picked configurations and differences under 2 points: 5 (2 in smoke)


def setup_experiment(name: str, profile: str = "cpu", data_dir: str = "./data", out_dir: str = "runs") -> Experiment:
    """The shared first cell of the notebooks: the profile's config (generated data in ``smoke``),
    its seeds, the teacher (trained once, then reused) and ``<out_dir>/figures/<name>``."""
    overrides = {"out_dir": out_dir} | ({} if profile == "smoke" else {"data_dir": data_dir})
    cfg = make_config(profile, **overrides)
    figures = os.path.join(out_dir, "figures", name)
    os.makedirs(figures, exist_ok=True)
    teacher = train(teacher_config(cfg))
    print(
        f"profile {profile}: {cfg.dataset}, {cfg.val_size} validation images, seeds 0-{cfg.n_seeds - 1}; teacher "
        f"{cfg.teacher_model} x{cfg.teacher_width:g} ({teacher.history['test_top1'].iloc[-1]:.2f}% test top-1); "
        f"students {cfg.model} x{cfg.width:g}, {cfg.epochs} epochs, {cfg.subset or 'all'} images per class"
    )
    return Experiment(cfg, range(cfg.n_seeds), teacher, figures, range(max(5, cfg.n_seeds) if cfg.n_seeds > 1 else 2))


def _row(role: str, results: list[RunResult]) -> dict:
    stats = summarize_seeds(results)
    cfg = results[0].config
    return {
        "run": role,
        "model": f"{cfg.model} x{cfg.width:g}",
        "params": count_params(results[0].model),
        "MFLOPs": count_flops(results[0].model) / 1e6,
        "seeds": len(results),
        "top1": stats["last_top1"],
        "top1_std": stats["last_top1_std"],
        "top1_ci95": stats["last_top1_ci95"],
        "top5": stats["last_top5"],
        "val_top1": pd.Series([r.history["val_top1"].iloc[-1] for r in results if "val_top1" in r.history]).mean(),
        "minutes": stats["minutes"],
    }


def plot_curves(groups: dict[str, list[RunResult]], teacher: RunResult, path: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, results in groups.items():
        plot_seeds(ax, results, "test_top1", f"{label} (n={len(results)})")
    ax.axhline(teacher.history["test_top1"].iloc[-1], color="k", ls="--", lw=1, label="teacher (final)")
    ax.set(xlabel="epoch", ylabel="test top-1 (%)", title="Independent vs distilled student")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def run_demo(cfg: Config) -> pd.DataFrame:
    """Teacher, then independent and KD students (same seeds, paired) in parallel; table + plot.

    The table's ``attrs["kd_vs_independent"]`` is the paired comparison of the two students.
    """
    teacher = train(teacher_config(cfg))
    seeds = range(cfg.seed, cfg.seed + cfg.n_seeds)
    configs = [replace(cfg, method="ce", teacher="", seed=s, data_seed=s) for s in seeds]
    configs += [replace(cfg, method="kd", teacher=teacher.run_dir, seed=s, data_seed=s) for s in seeds]
    jobs = "auto" if distributed()[1] == 1 else 1  # under torchrun every rank trains each run together
    results = run_all(configs, jobs=jobs, desc="students")
    independent, kd = results[: len(seeds)], results[len(seeds) :]
    table = pd.DataFrame([_row("teacher", [teacher]), _row("independent", independent), _row("kd", kd)])
    table.attrs["kd_vs_independent"] = compare(kd, independent) if len(seeds) > 1 else None
    out = os.path.join(cfg.out_dir, f"demo-{cfg.profile}")
    if not is_main_process():
        return table
    os.makedirs(out, exist_ok=True)
    table.to_csv(os.path.join(out, "results.csv"), index=False)
    k = kd[0].config
    label = f"KD (T={k.T:g}, CE {k.ce_weight:g}, KD {k.kd_weight:g})"
    plot_curves({"independent": independent, label: kd}, teacher, os.path.join(out, "curves.png"))
    return table


def _add_cli_options(parser) -> None:
    parser.add_argument(
        "--demo",
        action="store_true",
        default=False,
        help="train teacher, independent and KD students; print a comparison table",
    )
    parser.add_argument(
        "--sweep",
        nargs="+",
        metavar="FIELD=V1,V2",
        default=None,
        help="train every combination, e.g. --sweep T=1,2,4 kd_weight=1,3,9 (with --seeds, --jobs)",
    )
    parser.add_argument("--seeds", default=None, help="seeds, alone or with --sweep: 0-2 or 0,3,5")
    parser.add_argument("--jobs", default="auto", help="sweep worker processes (default auto: cores // threads)")


def main(argv=None):
    parser = build_parser("Distill a student from a trained teacher (or run the demo with --demo).")
    _add_cli_options(parser)
    args = parser.parse_args(argv)
    demo, grid, seeds, jobs = args.demo, args.sweep, args.seeds, args.jobs
    del args.demo, args.sweep, args.seeds, args.jobs
    if not hasattr(args, "method"):
        args.method = "kd"  # this is the distillation command line
    try:
        cfg = config_from_args(args)
        if demo:
            return _main_demo(cfg)
        if grid or seeds:  # --seeds alone: the one configuration over those seeds
            grid = parse_grid(grid) if grid else {"method": [cfg.method]}
            seeds = parse_seeds(seeds) if seeds else range(cfg.n_seeds)
            return _main_sweep(cfg, grid, seeds, jobs if jobs == "auto" else int(jobs))
        check_method_inputs(cfg)
        result = distill(cfg)
    except USAGE_ERRORS as err:
        parser.error(str(err))
    print_result(result)
    return result


def _main_demo(cfg: Config) -> pd.DataFrame:
    table = run_demo(cfg)
    if not is_main_process():
        return table
    out = os.path.join(cfg.out_dir, f"demo-{cfg.profile}")
    print(f"\nresults: {out}/results.csv, plot: {out}/curves.png")
    print(table.round(2).to_string(index=False))
    if table.attrs.get("kd_vs_independent") is not None:
        print(f"\nKD − independent, paired by seed (last-epoch test top-1): {table.attrs['kd_vs_independent']}")
    return table


def _main_sweep(cfg: Config, grid: dict, seeds, jobs) -> pd.DataFrame:
    df = sweep(cfg, grid, seeds=seeds, jobs=jobs)
    keys = list(grid)
    print(f"\nsweep: {len(df)} runs, table: {df.attrs['path']}")
    print(cell_table(df, keys).round(2).to_string())
    best = df[df["best"]]
    print(
        f"\npicked on validation: {df.attrs['best']} — val top-1 {best['val_top1'].mean():.2f}, "
        f"test top-1 {best['test_top1'].mean():.2f} ± {best['test_top1'].std():.2f} (n={len(best)})"
    )
    return df
