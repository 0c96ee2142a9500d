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
from checkpoints import load_checkpoint, load_weights, read_checkpoint, resolve_checkpoint
from config import Config
from distributed import barrier, distributed, is_main_process
from model import create_model
from registry import METHODS, resolve_recipe, wants_second_view
from run_folders import FAILED_FILE, history_frame, repair_run_folder, run_dir_for, same_run


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
    while True:
        try:
            os.makedirs(run_dir, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise ValueError(
                    f"{path} is a symbolic link, not this project's lock file: delete it and rerun"
                ) from err
            if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            yield False
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # the file locked must still be the one at ``path``: a run that failed early removes its folder
            if os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # lock the new folder instead
    try:
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


def finished_run(run_dir: str, cfg: Config, repair: bool = True) -> RunResult | None:
    """The stored result if ``run_dir`` holds this config, trained to the end (or, with
    ``cfg.stop_after``, at least that far), read from its checkpoint (the record); with ``repair``,
    the folder's ``config.json``, ``metrics.csv`` and ``FAILED`` are rewritten where they disagree
    with it (``run_folders.repair_run_folder``)."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        return None
    model, ckpt = load_checkpoint(path)
    epoch = ckpt.get("epoch") or 0
    if not (epoch == cfg.epochs or 0 < cfg.stop_after <= epoch) or not same_run(ckpt["config"], cfg):
        return None
    if repair:
        repair_run_folder(run_dir, ckpt)
    return RunResult(model, history_frame(ckpt["metrics"], ckpt.get("failed")), run_dir, cfg)


def build_student(cfg: Config) -> nn.Module:
    """The network a run trains: ``cfg.model`` at ``cfg.width``, from ``cfg.init_from`` if set."""
    num_classes = data_utils.DATASETS[cfg.dataset].num_classes
    student = create_model(cfg.model, num_classes=num_classes, width=cfg.width)
    if cfg.init_from:
        path = resolve_checkpoint(cfg.init_from)
        load_weights(student, read_checkpoint(path)["model"], path)
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
        done = finished_run(run_dir, cfg, repair=writable)
        if done is not None:
            return done
        if not writable:
            raise ValueError(f"{run_dir} is not writable and holds no finished run of this config: pass --out-dir")
        before = set(os.listdir(run_dir)) if os.path.isdir(run_dir) else set()  # what the run did not create
        try:
            return _train(cfg, run_dir, make_task, wrap_loader, make_student)
        except BaseException as err:
            if distributed()[1] == 1:
                with contextlib.suppress(OSError):  # the clean-up never hides the run's own error
                    _remove_early_failure(run_dir, before, keep_mark=isinstance(err, FloatingPointError))
            raise


def _remove_early_failure(run_dir: str, before: set[str], keep_mark: bool = False) -> None:
    """After a run failed before its first checkpoint, remove what it created (its ``config.json``,
    temporaries) and then the folder if nothing else is left in it but the lock; a folder with a
    checkpoint, or anything the run did not create, is kept. A run that diverged keeps its
    ``config.json`` and ``FAILED`` (``keep_mark``): the folder records why it failed."""
    if not os.path.isdir(run_dir) or os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        return
    keep = {"config.json", FAILED_FILE} if keep_mark and os.path.exists(os.path.join(run_dir, FAILED_FILE)) else set()
    for name in set(os.listdir(run_dir)) - before - keep:
        path = os.path.join(run_dir, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
    left = set(os.listdir(run_dir))
    if left <= {".lock"}:  # nothing but this project's lock file: the folder held nothing before the run
        if left:
            os.remove(os.path.join(run_dir, ".lock"))  # a run waiting for it locks afresh (see run_lock)
        os.rmdir(run_dir)


def _train(cfg, run_dir, make_task, wrap_loader, make_student) -> RunResult:
    with train_eval.thread_count(cfg.threads):
        loaders = make_loaders(cfg, prepare=False)  # draws from its own generators, not the model seed
        loaders.train.with_index = METHODS.get(cfg.method).needs_index
        loaders.train.strong_view = wants_second_view(cfg)
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
    make_student: Callable[[Config], nn.Module] = build_student,
) -> list[RunResult | Exception]:
    """Train (or reuse, or resume) the runs ``cfgs`` describe as one cohort; in order, each run's
    result, or the exception that stopped it alone.

    The runs must share a data stream (data, split, batch size, augmentation, data seed) and a
    thread count. Each batch is drawn once; ``share(tasks)`` may return ``(teacher, features)``, a
    frozen teacher every distilling member reads, which then runs once per batch. ``make_student(cfg)``
    builds each member's network, as ``train`` takes it. Every member is
    built, trained, checkpointed and resumed exactly as ``train`` does it alone, so its weights and
    metrics are the same to the bit (at the same thread count); finished members are read back.
    """
    cfgs = [resolve_recipe(c) for c in cfgs]
    _check_one_stream(cfgs)
    _prepare(cfgs[0])
    dirs = [run_dir_for(c) for c in cfgs]
    out: dict[str, RunResult | Exception] = {}
    with contextlib.ExitStack() as stack:
        todo, before = [], {}
        for d in sorted(set(dirs)):  # one lock order for every process: no two cohorts wait on each other
            cfg = cfgs[dirs.index(d)]
            writable = stack.enter_context(run_lock(d))
            out[d] = finished_run(d, cfg, repair=writable)
            if out[d] is None and not writable:
                out[d] = ValueError(f"{d} is not writable and holds no finished run of this config: pass --out-dir")
            elif out[d] is None:
                todo.append((cfg, d))
                before[d] = set(os.listdir(d))  # what the member did not create
        if todo:
            out.update(_train_together(todo, make_task, wrap_loader, share, make_student))
        for d, existed in before.items():  # a member that failed before its first checkpoint: as ``train`` does
            if isinstance(out[d], Exception) and distributed()[1] == 1:
                with contextlib.suppress(OSError):
                    _remove_early_failure(d, existed, keep_mark=isinstance(out[d], FloatingPointError))
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


def _train_together(todo, make_task, wrap_loader, share, make_student) -> dict:
    first = todo[0][0]
    with train_eval.thread_count(first.threads):
        loaders = make_loaders(first, prepare=False)  # draws from its own generators, not the model seeds
        loaders.train.with_index = any(METHODS.get(c.method).needs_index for c, _ in todo)
        loaders.train.strong_view = any(wants_second_view(c) for c, _ in todo)  # the others ignore it
        members, failed = [], {}
        for cfg, run_dir in todo:
            try:
                train_eval.set_seed(cfg.seed)  # each member built exactly as it would be alone
                student = make_student(cfg)
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
        result = RunResult(m.task.student.cpu(), history_frame(m.history, m.failed), m.run_dir, m.cfg)
        out[m.run_dir] = m.error if m.error is not None else result
    return out


def print_result(result: RunResult) -> None:
    if not is_main_process():
        return
    print(f"\nrun folder: {result.run_dir}")
    print(pd.DataFrame([summarize(result.history)]).round(2).to_string(index=False))
