"""Distillation: a student, a structurally frozen teacher and a method's loss, as one task for the loop.

    result = distill(make_config("cpu", method="kd", teacher="runs/<teacher>"))

``Distiller`` is what the loop trains for every method with a loss (``registry.Method.build``):
``forward(x, y)`` runs the student and the frozen teacher (or reads its cached logits) and returns
the loss's named terms. ``distill`` checks the method's inputs and the teacher, then trains the
run through ``runs.train``; methods with a runner of their own (``Method.run``) go there instead.
"""

from __future__ import annotations

import errno
import inspect
import json
import os

import torch
from torch import nn

import data_utils
from atomic_files import atomic_write_text
from checkpoints import load_checkpoint, state_digest
from config import Config, check_config
from distributed import distributed, is_main_process
from evaluation import evaluate
from registry import METHODS, loss_methods, resolve_recipe, wants_second_view
from run_folders import run_dir_for, run_identity, same_run
from runs import RunResult, build_student, make_loaders, train, train_together
from teacher_cache import use_teacher_cache


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
    the optimizer and checkpoints with the student; the teacher reaches neither. With
    ``needs_features`` both networks return their features for the loss (``s_feats``, ``t_feats``);
    with ``needs_index`` the loop must hand each batch's sample indices. With ``second_view`` both
    networks also run on the batch extra ``strong`` (a second view of the same images; the teacher
    online even where its logits of the first view are cached) and the loss gets their logits as
    ``strong_s`` and ``strong_t``; without it the extra is dropped.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        loss: nn.Module,
        teacher_bf16: bool = False,
        needs_features: bool = False,
        needs_index: bool = False,
        second_view: bool = False,
    ):
        super().__init__()
        self.student = student
        self.teacher = FrozenTeacher(teacher, bf16=teacher_bf16)
        self.loss = loss
        # what the method needs, as its registry entry declares it (``build_distiller`` passes them)
        self.needs_features, self.needs_index = needs_features, needs_index
        self.second_view = second_view

    def set_epoch(self, epoch: int) -> None:
        """The loop's epoch (0-based), for losses that change with it (a warm-up, say)."""
        if hasattr(self.loss, "set_epoch"):
            self.loss.set_epoch(epoch)

    def forward(self, x: torch.Tensor, y: torch.Tensor, teacher_logits=None, teacher_out=None, **extras):
        """``teacher_logits``: the teacher's logits for exactly these views, if cached; ``teacher_out``:
        its outputs (with its features) if a cohort already ran it on this batch; other named batch
        extras (``index``...) go to the loss by keyword."""
        strong = extras.pop("strong", None)  # (B, C, H, W) the second view, for a method that trains on it
        if self.needs_features:
            logits_s, feats_s = self.student(x, features=True)
            logits_t, feats_t = teacher_out if teacher_out is not None else self.teacher(x, features=True)
        else:
            logits_s, feats_s = self.student(x), None
            if teacher_logits is None:
                teacher_logits = self.teacher(x) if teacher_out is None else _logits(teacher_out)
            logits_t, feats_t = teacher_logits, None
        if self.second_view:
            if strong is None:
                raise ValueError("this method trains on a second view: set the loader's strong_view = True")
            extras.update(strong_s=_logits(self.student(strong)), strong_t=_logits(self.teacher(strong)))
        terms = self.loss(logits_s, logits_t, y, s_feats=feats_s, t_feats=feats_t, **extras)
        return logits_s, terms


def _logits(out):
    return out[0] if isinstance(out, tuple) else out


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
    method = METHODS.get(cfg.method)
    bf16 = cfg.teacher_amp == "bf16"
    return Distiller(
        student,
        teacher,
        loss,
        bf16,
        needs_features=method.needs_features,
        needs_index=method.needs_index,
        second_view=wants_second_view(cfg),
    )


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


def teacher_check_path(cfg: Config) -> str:
    """Where ``verify_teacher`` stores its check of ``cfg.teacher`` on ``cfg``'s data."""
    ident = run_identity(cfg)
    return os.path.join(cfg.out_dir, "teacher_checks", f"{ident['teacher']}-{ident.get('data', 'nodata')}.json")


def verify_teacher(cfg: Config) -> dict:
    """The teacher's validation and test accuracy, measured the first time it is used on this data
    (``<out_dir>/teacher_checks/<teacher>-<data>.json``), printed, and refused at chance level
    unless ``cfg.trust_teacher``. Where ``out_dir`` cannot be written (a read-only results mount),
    the check is made every time instead of being stored."""
    path = teacher_check_path(cfg)
    if os.path.isfile(path):
        with open(path) as f:
            check = json.load(f)
    else:
        teacher = load_teacher(cfg.teacher, cfg)
        loaders = make_loaders(cfg)
        check = {"teacher": cfg.teacher, "test_top1": evaluate(teacher, loaders.test)["top1"]}
        if loaders.val is not None:
            check["val_top1"] = evaluate(teacher, loaders.val)["top1"]
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_text(path, json.dumps(check, indent=2))
        except PermissionError:
            pass  # not stored: measured again next time
        except OSError as err:
            if err.errno != errno.EROFS:
                raise
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


def checks_teacher(cfg: Config) -> bool:
    """Whether ``distill(cfg)`` checks its teacher (``verify_teacher``): the methods with a loss."""
    return METHODS.get(cfg.method).run is None


def teacher_checks(configs: list[Config]) -> None:
    """Check every teacher that ``distill`` would check for ``configs``, each once (a sweep does it
    before its workers start, so they read the stored check instead of each measuring it)."""
    seen = set()
    for cfg in configs:
        if not checks_teacher(cfg):
            continue
        check_method_inputs(cfg)
        path = teacher_check_path(cfg)
        if path not in seen:
            seen.add(path)
            verify_teacher(cfg)


def check_run_folder(cfg: Config) -> None:
    """Refuse up front a run named with ``cfg.name`` whose folder holds another config's run (before
    the teacher is checked or anything is written); only the checkpoint is authoritative."""
    if not cfg.name:
        return
    run_dir = run_dir_for(cfg)
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        return
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("config")
    except Exception:
        return  # unreadable: the run's own reading of it names the file and the remedy
    if not same_run(saved, cfg):
        raise ValueError(
            f"name={cfg.name!r}: {run_dir} holds a run with a different config; "
            "pick another --name or delete the folder"
        )


def distill(cfg: Config) -> RunResult:
    """Train (or reuse) the run ``cfg`` describes: a student distilled with ``cfg.method``'s loss, or
    any registered method through its own run function (``ce``: plain training; ``dml``: a cohort;
    ``partition``: the specialists' first stage)."""
    method = METHODS.get(cfg.method)  # a bad name fails before any data is read
    check_config(cfg)  # a bad name or out_dir fails before anything is written
    check_method_inputs(cfg)
    check_run_folder(cfg)
    if method.run is not None:
        return method.run(cfg)
    verify_teacher(cfg)
    return train(cfg, make_task=build_distiller, wrap_loader=use_teacher_cache if cfg.teacher_cache else None)


def shares_a_stream(cfg: Config) -> bool:
    """Whether a run of ``cfg.method`` can train in a cohort: a distillation loss, plain training, or
    a method the loop trains with a student and task of its own (the specialists' first stage)."""
    method = METHODS.get(cfg.method)
    return method.build is not None or method.run is train or method.make_task is not None


def distill_together(cfgs: list[Config]) -> list[RunResult | Exception]:
    """``distill`` for every config, trained as one cohort (``runs.train_together``): the batches
    drawn once, the teacher run once per batch (or its cached logits read once), each member
    exactly as alone. The configs share a data stream and, where they distil, one teacher at one
    precision, all from its cached logits or all online. In order: each run's result, or the
    exception that stopped it alone."""
    out: list = [None] * len(cfgs)
    members = []
    for i, cfg in enumerate(cfgs):
        try:
            if not shares_a_stream(cfg):
                raise ValueError(f"method {cfg.method!r} trains with a runner of its own, not in a cohort")
            check_config(cfg)  # as distill does: nothing written for a config that cannot run
            check_method_inputs(cfg)
            check_run_folder(cfg)
            if METHODS.get(cfg.method).build is not None:
                verify_teacher(cfg)
            members.append(i)
        except Exception as err:
            out[i] = err
    cached = {cfg.teacher_cache for cfg in (cfgs[i] for i in members) if _distils_online_or_cached(cfg)}
    if len(cached) > 1:
        raise ValueError("a cohort's distilling members read the teacher's cached logits, or all run it online")
    wrap = use_teacher_cache if cached == {True} else None
    results = train_together([cfgs[i] for i in members], _task, wrap, None if wrap else _shared_teacher, _student)
    for i, result in zip(members, results, strict=True):
        out[i] = result
    return out


def _distils_online_or_cached(cfg: Config) -> bool:
    method = METHODS.get(cfg.method)
    return method.build is not None or (method.make_task is not None and method.needs_teacher)


def _task(cfg: Config, student: nn.Module, train_loader) -> nn.Module | None:
    method = METHODS.get(cfg.method)
    if method.build is not None:
        return build_distiller(cfg, student, train_loader)
    return method.make_task(cfg, student, train_loader) if method.make_task else None


def _student(cfg: Config) -> nn.Module:
    return (METHODS.get(cfg.method).make_student or build_student)(cfg)


def _shared_teacher(tasks: list[nn.Module]) -> tuple:
    """The frozen teacher the distilling members share (checked: one set of weights, one precision),
    and whether any of them needs its features."""
    # a Distiller, or any task with a FrozenTeacher that takes the batch extra ``teacher_out``
    distillers = [t for t in tasks if isinstance(getattr(t, "teacher", None), FrozenTeacher)]
    if not distillers:
        return None, False
    teachers = {(state_digest(t.teacher.net.state_dict()), t.teacher.bf16) for t in distillers}
    if len(teachers) > 1:
        raise ValueError("the distilling members of a cohort must share one teacher at one precision")
    return distillers[0].teacher, any(getattr(t, "needs_features", False) for t in distillers)


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
