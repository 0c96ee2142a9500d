"""The one training/evaluation loop, and the command line that trains a teacher or a baseline.

Anything whose ``forward(x, y)`` returns ``(logits, {term_name: loss})`` trains here: a
plain model (wrapped in ``Vanilla``), a ``distiller.Distiller``, a cohort of students
(``methods/dml.py``), any later method. The loop sums the terms, logs each of them, evaluates
every epoch (the task's own ``test_metrics`` if it has them) and, given a run folder, checkpoints
every epoch and resumes an interrupted run (``run_folders`` describes the folder).

    python train_eval.py --profile cpu --model vgg13 --width 0.25 --epochs 15 --subset 0

Whole runs (``train``, ``make_loaders``), the config (``Config``, ``make_config``) and run folders
(``run_dir_for``, ``load_history``) live in their own modules and are importable from here too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from atomic_files import atomic_write_text, remove_stale_temporaries
from checkpoints import read_checkpoint, save_checkpoint
from config import Config
from distributed import average_buffers, barrier, distributed, is_main_process, sum_over_ranks
from evaluation import keep_if_picked, read_test_at_picked, test_metrics
from exports import moved
from failures import RunFailedWarning, RunRecoveredWarning, chance_failure, judged_at_chance, pretraining_epochs
from optimizers import build_optimizer, build_scheduler
from progress import epoch_bar
from run_folders import history_frame, run_name, same_run, set_failure_mark


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def amp_enabled(cfg: Config, device: torch.device) -> bool:
    return cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")


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


@dataclass
class Member:
    """One run in the loop, with everything that is its own: its task, optimizer, schedule, RNG
    state, run folder and history. ``fit`` trains one; ``fit_cohort`` trains several on one stream."""

    task: nn.Module
    step: nn.Module  # what the loop calls: the task, or DDP around it, compiled or not
    optimizer: torch.optim.Optimizer
    scheduler: object
    cfg: Config
    run_dir: str | None
    history: list
    start: int  # the first epoch still to train (after a resume)
    rng: tuple  # the generators' state this run's next step starts from
    callbacks: tuple = ()
    label: str = "train"  # its name in progress bars and warnings
    judged: bool = True  # whether the chance rule applies (``chance_failure``)
    grace: int = 0  # epochs of a pre-training stage, before the chance rule's patience starts
    num_classes: int = 0
    failed: str | None = None  # why it counts as failed (still at chance), or None
    picked: dict | None = None  # the epoch validation picks so far, its val top-1 and weights (test read at the end)
    error: Exception | None = None  # why it stopped early, in a cohort that went on
    own: list = field(default_factory=lambda: [0.0, 0.0])  # this epoch's own wall and CPU seconds


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextlib.contextmanager
def _as_member(m: Member, device: torch.device):
    """Run the body with the member's own RNG state and time, so a cohort draws for each member exactly
    what it would draw alone (CRD's negatives, say)."""
    _set_rng_state(m.rng, device)
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        m.own[0] += time.perf_counter() - t0
        m.own[1] += time.process_time() - cpu0
        m.rng = _rng_state(device)


def train_one_epoch(members: list[Member], loader, device, amp: bool, teacher=None, features=False) -> list[dict]:
    """One pass over ``loader`` for every member; per-step values stay on the device (no host sync)
    until the epoch ends. With ``teacher`` (a frozen teacher the members share) it runs once per
    batch and its outputs reach each task as the batch extra ``teacher_out``."""
    for m in members:
        m.task.train()
    sums: list[dict[str, torch.Tensor]] = [{} for _ in members]
    correct = [torch.zeros((), device=device) for _ in members]
    n, t0 = 0, time.perf_counter()
    for x, y, *rest in loader:  # rest: the batch's named extras, e.g. cached teacher logits, sample indices
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        extras = {k: v.to(device, non_blocking=True) for k, v in (rest[0] if rest else {}).items()}
        if teacher is not None:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                extras["teacher_out"] = teacher(x, features=features)
        for i, m in enumerate(members):
            if m.error is not None:
                continue
            try:
                with _as_member(m, device):
                    logits, terms, loss = optimizer_step(m.step, m.optimizer, x, y, extras, amp=amp)
            except Exception as err:
                if len(members) == 1:
                    raise
                m.error = err  # it stops alone; the others go on
                continue
            for name, value in {"loss": loss, **terms}.items():
                sums[i][name] = sums[i].get(name, 0) + value.detach().float() * len(y)
            correct[i] += (logits.argmax(1) == y).sum()
        n += len(y)
    if n == 0:
        raise ValueError("the training loader yielded no batch; lower batch_size or use more data")
    seconds = time.perf_counter() - t0
    return [_train_row(s, c, n, seconds) for s, c in zip(sums, correct, strict=True)]


def _train_row(sums: dict, correct: torch.Tensor, n: int, seconds: float) -> dict:
    names = list(sums)
    totals = sum_over_ranks(torch.stack([*(sums[k] for k in names), correct.float(), torch.tensor(float(n))]))
    n = totals[-1].item()
    row = {f"train_{k}": (v / n).item() for k, v in zip(names, totals, strict=False)}
    row["train_top1"] = 100 * totals[-2].item() / n
    row["train_images_per_s"] = n / seconds  # all processes together
    return row


def _resume(task, optimizer, scheduler, run_dir: str, cfg: Config) -> tuple[int, list, dict | None]:
    """The epoch to start from, the history so far and the weights validation picked so far."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        return 0, [], None
    ckpt = read_checkpoint(path)
    if not same_run(ckpt.get("config"), cfg):
        raise RuntimeError(f"{run_dir} holds a run with a different config; pick another --name or delete the folder")
    try:
        state = ckpt["train_state"]
        task.load_state_dict(state["task"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        return ckpt["epoch"], list(ckpt["metrics"] or []), state.get("picked")
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # torch names neither the file nor the fix
        raise ValueError(
            f"{path} cannot be resumed: its training state is missing or does not fit this run "
            f"({type(err).__name__}: {' '.join(str(err).split())[:300]}); delete it to train the run from the start"
        ) from err


def _check_finite(row: dict, epoch: int, history: list, run_dir: str | None = None) -> None:
    """Stop before a diverged epoch overwrites the last good checkpoint; the run folder is marked
    failed (``FAILED`` holds the reason; the checkpoint kept is the last good epoch's)."""
    if not math.isfinite(row["train_loss"]):
        reason = f"training diverged in epoch {epoch + 1} (train loss {row['train_loss']})"
        if run_dir and is_main_process():
            set_failure_mark(run_dir, reason)
        kept = f"the checkpoint of epoch {len(history)} is kept" if history else "nothing was saved"
        raise FloatingPointError(
            f"{reason}; {kept}. Lower the learning rate (--lr) or the loss weights and start again."
        )


def _save(task, optimizer, scheduler, run_dir, cfg, history, epoch, rng, failed=None, picked=None) -> None:
    """metrics.csv, then the checkpoint (the record: ``failed`` only in a failed run's), then ``FAILED``.
    ``picked``: the weights of the epoch validation picks so far, while their test is still to read."""
    atomic_write_text(os.path.join(run_dir, "metrics.csv"), history_frame(history, failed).to_csv(index=False))
    train_state = {
        "task": task.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
        **({"picked": picked} if picked is not None else {}),
    }
    save_checkpoint(
        os.path.join(run_dir, "checkpoint.pt"),
        task.student,
        config=cfg,
        metrics=history,
        epoch=epoch,
        train_state=train_state,
        **({"failed": failed} if failed else {}),
    )
    set_failure_mark(run_dir, failed)


def _wrap_for_training(task: nn.Module, device: torch.device, cfg: Config, world: int) -> nn.Module:
    """What the loop calls: the task itself, or DDP around it (several processes), compiled or not."""
    step = task
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step = DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(step) if cfg.compile else step


# The columns of a history that differ between two runs of one config: how long, not what, it trained.
TIMING_COLUMNS = ["seconds", "cpu_seconds", "train_images_per_s"]


def start_member(
    module: nn.Module,
    train_loader,
    cfg: Config,
    run_dir: str | None = None,
    callbacks: tuple[Callable[[int, dict], None], ...] = (),
) -> Member:
    """``module`` made ready to train: on its device, with its optimizer and schedule, resumed from
    ``run_dir``'s checkpoint if an unfinished run of ``cfg`` is there (another config's is refused),
    ``config.json`` written. Its RNG state is the generators' state now (or the checkpoint's)."""
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
    optimizer = build_optimizer(task, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    start, history, picked = 0, [], None
    if run_dir:
        start, history, picked = _resume(task, optimizer, scheduler, run_dir, cfg)  # refuses another config's first
        if is_main_process():
            os.makedirs(run_dir, exist_ok=True)
            remove_stale_temporaries(run_dir)
            if not start:  # no checkpoint: a mark an earlier attempt left is not this run's
                set_failure_mark(run_dir, None)
            atomic_write_text(os.path.join(run_dir, "config.json"), json.dumps(cfg.to_dict(), indent=2))
    step = _wrap_for_training(task, device, cfg, world)
    m = Member(task, step, optimizer, scheduler, cfg, run_dir, history, start, _rng_state(device), callbacks)
    m.label = run_name(cfg) if run_dir else "train"
    m.picked = picked
    m.judged, m.grace = judged_at_chance(task), pretraining_epochs(task)
    m.num_classes = getattr(task.student, "num_classes", None) or _dataset_classes(cfg)
    m.failed = chance_failure(history, m.num_classes, cfg.epochs, m.grace) if m.judged else None  # when resumed
    return m


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

    A run still at chance (``chance_failure``) is warned about (``RunFailedWarning``, naming the
    run and the epoch) and marked failed: column ``failed`` of its history and ``metrics.csv``,
    key ``failed`` of its checkpoint, file ``FAILED`` in its folder; it trains on (it may still
    learn; the mark goes once it does). A diverged loss stops the run and marks it too.
    """
    member = start_member(module, train_loader, cfg, run_dir, callbacks)
    fit_cohort([member], train_loader, test_loader, val_loader)
    if member.error is not None:
        raise member.error
    return history_frame(member.history, member.failed)


def fit_cohort(members: list[Member], train_loader, test_loader, val_loader=None, teacher=None, features=False):
    """Train every member (``start_member``) on one stream, each exactly as ``fit`` would alone.

    Each batch is drawn once; with ``teacher`` (the frozen teacher the members distil from) the
    teacher runs once per batch for all of them (``features``: with its features). A member runs
    with its own RNG state, optimizer, schedule, epochs and run folder; one that fails (a diverged
    loss, an error in its step) stops alone with ``member.error`` set, the others finish.
    """
    cfg = members[0].cfg
    device = resolve_device(cfg.device)
    amp = amp_enabled(cfg, device)
    solo = len(members) == 1
    bars = {id(m): epoch_bar(m.cfg.epochs, m.label, m.start) for m in members}
    for epoch in range(min(m.start for m in members), max(_until(m.cfg) for m in members)):
        active = [m for m in members if m.error is None and m.start <= epoch < _until(m.cfg)]
        if not active:
            continue
        t0, cpu0 = time.perf_counter(), time.process_time()
        train_loader.set_epoch(epoch)
        for m in active:
            m.own = [0.0, 0.0]
            if hasattr(m.task, "set_epoch"):  # e.g. a loss with a warm-up (DKD)
                m.task.set_epoch(epoch)
        rows = train_one_epoch(active, train_loader, device, amp, teacher, features)
        # what the members did together (drawing the batches, the teacher), shared equally among them
        together = [time.perf_counter() - t0 - sum(m.own[0] for m in active)]
        together.append(time.process_time() - cpu0 - sum(m.own[1] for m in active))
        share = [t / len(active) for t in together]
        for m, row in zip(active, rows, strict=True):
            if m.error is None:
                try:
                    _end_epoch(m, epoch, row, val_loader, test_loader, amp, device, share)
                except Exception as err:
                    if solo:
                        raise
                    m.error = err  # it stops alone; its last checkpoint is kept
                    continue
                bars[id(m)].update(1)
                bars[id(m)].set_postfix(loss=f"{row['train_loss']:.3f}", **_shown(m.history[-1]))
                for cb in m.callbacks:
                    cb(epoch, m.history[-1])
    for bar in bars.values():
        bar.close()
    barrier()  # the last checkpoint exists for every process once fit returns


def _until(cfg: Config) -> int:
    """The epoch a run trains to now: the schedule's end, or ``stop_after`` (a pause it resumes from)."""
    return cfg.stop_after or cfg.epochs


def _shown(row: dict) -> dict:
    return {k: f"{row[k]:.2f}" for k in ("val_top1",) if k in row}


def _end_epoch(m: Member, epoch: int, row: dict, val_loader, test_loader, amp: bool, device, share) -> None:
    """Evaluate, check, schedule and checkpoint one member after its training pass of ``epoch``."""
    with _as_member(m, device):
        average_buffers(m.task)
        row = {"epoch": epoch + 1, "lr": m.optimizer.param_groups[0]["lr"], **row}
        if val_loader is not None:
            row.update({f"val_{k}": v for k, v in test_metrics(m.task, val_loader, amp).items()})
        if m.cfg.eval_test == "every" or epoch + 1 == m.cfg.epochs:
            row.update({f"test_{k}": v for k, v in test_metrics(m.task, test_loader, amp).items()})
        if m.cfg.eval_test != "every" and "val_top1" in row:
            keep_if_picked(m, row)
        if epoch + 1 == m.cfg.epochs and m.picked is not None:
            read_test_at_picked(m, test_loader, amp)
    row["seconds"] = m.own[0] + share[0]
    # CPU time of all this process's threads: unlike ``seconds``, it barely grows while other jobs
    # share the cores (docs/commands.md, metrics.csv)
    row["cpu_seconds"] = m.own[1] + share[1]
    row["threads"] = torch.get_num_threads() if device.type == "cpu" else 0
    _check_finite(row, epoch, m.history, m.run_dir)
    m.scheduler.step()
    m.history.append(row)
    was, m.failed = m.failed, chance_failure(m.history, m.num_classes, m.cfg.epochs, m.grace) if m.judged else None
    if m.failed and (not was or epoch == m.start) and is_main_process():
        warnings.warn(f"run {m.label}, epoch {epoch + 1}: {m.failed}; marked failed", RunFailedWarning, 2)
    elif was and not m.failed and is_main_process():  # a slow start, not a failure: say so after the alarm
        top1 = row.get("val_top1", row.get("test_top1", row["train_top1"]))
        warnings.warn(
            f"run {m.label}, epoch {epoch + 1}: left chance (top-1 {top1:.2f}); no longer failed",
            RunRecoveredWarning,
            2,
        )
    if m.run_dir and is_main_process():  # one writer; every rank holds the same weights
        _save(m.task, m.optimizer, m.scheduler, m.run_dir, m.cfg, m.history, epoch + 1, m.rng[0], m.failed, m.picked)


def _dataset_classes(cfg: Config) -> int:
    import data_utils

    return data_utils.DATASETS[cfg.dataset].num_classes


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


# ----------------------------------------------------------------------------- the teacher / baseline command line


def main(argv=None):
    from config import build_parser, config_from_args, run_cli
    from distiller import check_run_folder
    from distributed import init_distributed
    from registry import METHODS
    from runs import print_result, train

    init_distributed()
    parser = build_parser("Train a teacher or an independent (cross-entropy) student.", argv)

    def body(args):
        cfg = config_from_args(args)
        if METHODS.get(cfg.method).run is not train:  # a method with a loss or a runner of its own
            raise ValueError(f"train_eval.py trains with cross-entropy only; use train_kd.py for --method {cfg.method}")
        check_run_folder(cfg)  # --name of a folder holding another config's run: refused before anything is written
        return train(cfg)

    result = run_cli(parser, body, argv)
    print_result(result)
    return result


__getattr__ = moved(
    __name__,
    {
        "evaluation": "evaluate predict",
        "progress": "progress_bars progress_enabled",
        "failures": "RunFailedWarning chance_failure chance_patience pretraining_epochs CHANCE_MARGIN",
        "config": "USAGE_ERRORS make_config check_config PROFILES CHOICES build_parser config_from_args",
        "registry": "METHODS Method register_method resolve_recipe",
        "run_folders": "run_identity run_dir_for load_history load_config NOT_IN_IDENTITY",
        "runs": "RunResult print_result train make_loaders prepare_data finished_run build_student run_lock",
        "distributed": "init_distributed",
        "atomic_files": "atomic_save",
        "checkpoints": "file_digest",
    },
)

if __name__ == "__main__":
    main(sys.argv[1:])
