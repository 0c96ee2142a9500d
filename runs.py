"""Whole runs: prepare the data, hold the run folder's lock, reuse, resume or train.

    result = train(make_config("cpu", model="vgg13", width=0.25))   # a RunResult
    result.model, result.history, result.run_dir, result.config

``train`` is what every method's run goes through (``distiller.distill`` for distillation): the
same config finds the same folder, a finished run there is read back, an unfinished one resumes.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
from torch import nn

import data_utils
import train_eval
from analysis import summarize
from checkpoints import load_checkpoint, read_checkpoint
from config import Config
from distributed import barrier, distributed, is_main_process
from model import create_model
from registry import METHODS, resolve_recipe
from run_folders import run_dir_for, same_run


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


def _prepare(cfg: Config) -> None:
    if is_main_process():
        prepare_data(cfg)
    barrier()


@contextlib.contextmanager
def run_lock(run_dir: str):
    """Hold an exclusive lock on a run folder (one process at a time trains or checks it).

    Yields whether the folder is writable: on a read-only mount a finished run can still be read
    back, unlocked (nothing can change it). The lock file is opened without following a symbolic
    link and never truncated, so a link planted in a shared folder cannot make it clobber a file.
    """
    if distributed()[1] > 1:  # every rank trains the same run together
        yield True
        return
    import fcntl

    path = os.path.join(run_dir, ".lock")
    try:
        os.makedirs(run_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link, not this project's lock file: delete it and rerun") from err
        if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def make_loaders(cfg: Config, prepare: bool = True) -> data_utils.CifarLoaders:
    """``(train, val, test)``: training loader (this process's shard under torchrun), the held-out
    validation images (None when ``cfg.val_size`` is 0) and the whole test set. ``prepare``:
    first make sure the data exists (``train`` has done it already)."""
    rank, world = distributed()
    if prepare:
        _prepare(cfg)
    return data_utils.get_cifar_loaders(
        cfg.dataset,
        cfg.batch_size,
        cfg.data_dir,
        device=train_eval.resolve_device(cfg.device),
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
    if ckpt.get("epoch") != cfg.epochs or not same_run(ckpt["config"], cfg):
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
    teacher outputs to each batch). ``make_student(cfg)`` builds what is trained and checkpointed
    (a group of students, say). Method parameters left unset take the method's recipe first
    (``resolve_recipe``); the result's ``config`` is the resolved one, as saved in the run folder.
    """
    cfg = resolve_recipe(cfg)
    _prepare(cfg)  # the data is part of the run's identity
    run_dir = run_dir_for(cfg)
    with run_lock(run_dir) as writable:  # the same run started twice: the second waits, then reuses the first's
        done = finished_run(run_dir, cfg)
        if done is not None:
            return done
        if not writable:
            raise ValueError(f"{run_dir} is not writable and holds no finished run of this config: pass --out-dir")
        return _train(cfg, run_dir, make_task, wrap_loader, make_student)


def _train(cfg, run_dir, make_task, wrap_loader, make_student) -> RunResult:
    with train_eval.thread_count(cfg.threads):
        loaders = make_loaders(cfg, prepare=False)  # draws from its own generators, not the model seed
        loaders.train.with_index = METHODS.get(cfg.method).needs_index
        train_eval.set_seed(cfg.seed)
        student = make_student(cfg)
        task = make_task(cfg, student, loaders.train) if make_task else train_eval.Vanilla(student)
        train_loader = wrap_loader(task, loaders.train, cfg) if wrap_loader else loaders.train
        history = train_eval.fit(task, train_loader, loaders.test, cfg, run_dir, val_loader=loaders.val)
    return RunResult(task.student.cpu(), history, run_dir, cfg)


def train_together(
    cfgs: list[Config],
    make_task: Callable[[Config, nn.Module, object], nn.Module] | None = None,
    wrap_loader: Callable[[nn.Module, object, Config], object] | None = None,
    share: Callable[[list[nn.Module]], tuple] | None = None,
) -> list[RunResult | Exception]:
    """Train (or reuse, or resume) the runs ``cfgs`` describe as one cohort; in order, each run's
    result, or the exception that stopped it alone.

    The runs must share a data stream (data, split, batch size, augmentation, data seed) and a
    thread count. Each batch is drawn once; ``share(tasks)`` may return ``(teacher, features)``, a
    frozen teacher every distilling member reads, which then runs once per batch. Every member is
    built, trained, checkpointed and resumed exactly as ``train`` does it alone, so its weights and
    metrics are the same to the bit (at the same thread count); finished members are read back.
    """
    cfgs = [resolve_recipe(c) for c in cfgs]
    _check_one_stream(cfgs)
    _prepare(cfgs[0])
    dirs = [run_dir_for(c) for c in cfgs]
    out: dict[str, RunResult | Exception] = {}
    with contextlib.ExitStack() as stack:
        todo = []
        for d in sorted(set(dirs)):  # one lock order for every process: no two cohorts wait on each other
            cfg = cfgs[dirs.index(d)]
            writable = stack.enter_context(run_lock(d))
            out[d] = finished_run(d, cfg)
            if out[d] is None and not writable:
                out[d] = ValueError(f"{d} is not writable and holds no finished run of this config: pass --out-dir")
            elif out[d] is None:
                todo.append((cfg, d))
        if todo:
            out.update(_train_together(todo, make_task, wrap_loader, share))
    return [out[d] for d in dirs]


STREAM_FIELDS = (
    "dataset",
    "data_dir",
    "synthetic",
    "subset",
    "val_size",
    "split_seed",
    "batch_size",
    "crop_pad",
    "flip",
    "data_seed",
    "channels_last",
    "device",
    "amp",
    "threads",
)


def _check_one_stream(cfgs: list[Config]) -> None:
    for key in STREAM_FIELDS:
        values = {repr(getattr(c, key)) for c in cfgs}
        if len(values) > 1:
            raise ValueError(f"the runs of a cohort must share one data stream, but they differ in {key}: {values}")


def _train_together(todo, make_task, wrap_loader, share) -> dict:
    first = todo[0][0]
    with train_eval.thread_count(first.threads):
        loaders = make_loaders(first, prepare=False)  # draws from its own generators, not the model seeds
        loaders.train.with_index = any(METHODS.get(c.method).needs_index for c, _ in todo)
        members, failed = [], {}
        for cfg, run_dir in todo:
            try:
                train_eval.set_seed(cfg.seed)  # each member built exactly as it would be alone
                student = build_student(cfg)
                task = make_task(cfg, student, loaders.train) if make_task else None
                task = train_eval.Vanilla(student) if task is None else task
                members.append(train_eval.start_member(task, loaders.train, cfg, run_dir))
            except Exception as err:  # a member that cannot start stops alone
                failed[run_dir] = err
        train_loader = loaders.train
        distilling = [m for m in members if hasattr(m.task, "teacher")]
        if wrap_loader is not None and distilling:  # the stored logits every distilling member reads
            train_loader = wrap_loader(distilling[0].task, loaders.train, distilling[0].cfg)
        teacher, features = share([m.task for m in members]) if share and members else (None, False)
        if members:
            train_eval.fit_cohort(members, train_loader, loaders.test, loaders.val, teacher, features)
    out = dict(failed)
    for m in members:
        result = RunResult(m.task.student.cpu(), pd.DataFrame(m.history), m.run_dir, m.cfg)
        out[m.run_dir] = m.error if m.error is not None else result
    return out


def print_result(result: RunResult) -> None:
    if not is_main_process():
        return
    print(f"\nrun folder: {result.run_dir}")
    print(pd.DataFrame([summarize(result.history)]).round(2).to_string(index=False))
