"""Which runs train together: a sweep's runs grouped into cohorts that share a stream and a teacher.

Runs of one seed see the same batches (the data seed fixes the stream); runs of one teacher would
each run it on them. ``plan_cohorts`` groups the runs that can share both into cohorts, and splits
the costliest (by the training each member has left: ``work_left``) while there are more workers
than cohorts, or while a split shortens the last round (3 equal cohorts on 2 workers; three
teachers of different sizes in one), so the cores stay busy; each cohort is one
``distiller.distill_together`` in one worker: the batches drawn once, the teacher run once per
batch, every member exactly as alone (weights and metrics to the bit).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import numpy as np

from checkpoints import file_digest
from config import Config
from distiller import distill_together, shares_a_stream
from model import count_flops, create_model
from registry import METHODS
from run_folders import FAILED_FILE, run_dir_for
from runs import STREAM_FIELDS


def stream_key(cfg: Config) -> tuple:
    """What runs must share to draw the same batches in one process, and to write beside each other."""
    return (*(repr(getattr(cfg, k)) for k in STREAM_FIELDS), cfg.epochs, cfg.out_dir)


def teacher_key(cfg: Config) -> tuple | None:
    """What distilling runs must share to read one teacher's outputs: its weights, its precision,
    and whether they come from the cache (None: the run reads no teacher)."""
    method = METHODS.get(cfg.method)
    if not method.needs_teacher or (method.build is None and method.make_task is None):
        return None
    cached = cfg.teacher_cache and not method.needs_features
    return file_digest(cfg.teacher), cfg.teacher_amp, cached, cfg.cache_dtype if cached else None


def plan_cohorts(
    configs: list[Config], workers: int = 1, method_cost: Mapping[str, float] | None = None
) -> list[list[int]]:
    """Indices of ``configs`` grouped into cohorts: in the order of their first member with one worker,
    the costliest first with several (the pool takes them in this order: a long one started last would
    leave the other workers idle at the end).

    Runs that cannot share (a method with a runner of its own) stay alone. Runs without a teacher
    join the largest cohort of their stream. While there are fewer cohorts than ``workers``, the
    costliest is split in two of about equal work (each part runs its own teacher): fewer shared
    forwards, busier cores; then again while that shortens the last round (``makespan``, with each
    run's ``work_left``: a finished run costs nothing, a large model more than a small one, and a
    method by its ``method_cost``).
    """
    groups: dict[tuple, list[int]] = {}
    alone: list[list[int]] = []
    teachers = [teacher_key(cfg) for cfg in configs]  # each a file digest: read once
    for i, cfg in enumerate(configs):
        if shares_a_stream(cfg):
            groups.setdefault((stream_key(cfg), teachers[i]), []).append(i)
        else:
            alone.append([i])
    for stream, teacher in list(groups):
        if teacher is None:
            hosts = [k for k in groups if k[0] == stream and k[1] is not None]
            if hosts:
                groups[max(hosts, key=lambda k: len(groups[k]))] += groups.pop((stream, teacher))
    cohorts = [sorted(m) for m in groups.values()] + alone
    online = {i for i, key in enumerate(teachers) if key is not None and not key[2]}
    cost = work_left(configs, method_cost)
    while len(cohorts) < workers and max(len(c) for c in cohorts) > 1:
        cohorts = _split_costliest(cohorts, cost)

    def ordered(units: list[list[int]]) -> list[list[int]]:
        by_member = sorted(units, key=lambda c: c[0])
        return by_member if workers == 1 else sorted(by_member, key=lambda c: -sum(cost[i] for i in c))

    cohorts = ordered(cohorts)
    # a last round that leaves workers idle (3 equal cohorts on 2 workers): split while that shortens it
    while workers > 1 and max(len(c) for c in cohorts) > 1:
        finer = ordered(_split_costliest(cohorts, cost))
        if makespan(finer, online, workers, cost) >= makespan(cohorts, online, workers, cost):
            break
        cohorts = finer
    return cohorts


def _split_costliest(cohorts: list[list[int]], cost: list[float]) -> list[list[int]]:
    """The costliest cohort of several members cut in two parts of about equal work, in member order."""
    splittable = [c for c in cohorts if len(c) > 1]
    big = max(splittable, key=lambda c: (sum(cost[i] for i in c), len(c)))
    total, run, cut = sum(cost[i] for i in big), 0.0, len(big) // 2
    if total > 0:  # the first cut where the first part reaches half the work (at least one member each side)
        for k, i in enumerate(big[:-1], start=1):
            run += cost[i]
            if run >= total / 2:
                cut = k
                break
    rest = [c for c in cohorts if c is not big]
    return rest + [big[:cut], big[cut:]]


@functools.cache
def _mflops(model: str, width: float) -> float:
    return count_flops(create_model(model, num_classes=10, width=width)) / 1e6


def work_left(configs: list[Config], method_cost: Mapping[str, float] | None = None) -> list[float]:
    """Each run's training left, in member steps of the median unfinished run: its student's forward
    MFLOPs (times its members) times the epochs it has not trained (its ``metrics.csv`` rows), times
    its method's ``method_cost`` (a step relative to CE's on the same student; 1 where not given). A
    finished or failed run costs 0: it is read back. Students of one size cost one step each.

    The FLOPs of the student alone miss what a method adds (ReviewKD's fusion, CRD's memory, KDSVD's
    SVDs), and the FLOPs of those additions predict CPU time poorly (measured: ReviewKD on MobileNetV2
    40x CE's FLOPs, 12x its minutes), so the cost given should be measured: ``kd_table`` passes each
    method's minutes per run in the untuned table over CE's."""
    method_cost = method_cost or {}
    raw = []
    for cfg in configs:
        folder = run_dir_for(cfg)
        metrics = os.path.join(folder, "metrics.csv")
        done = 0
        if os.path.isfile(metrics):
            with open(metrics) as f:
                done = sum(1 for _ in f) - 1  # a header, then one row per trained epoch
        end = cfg.stop_after or cfg.epochs
        failed = os.path.isfile(os.path.join(folder, FAILED_FILE))
        left = 0 if failed else max(end - done, 0)
        raw.append(left * _mflops(cfg.model, cfg.width) * max(cfg.members, 1) * method_cost.get(cfg.method, 1.0))
    unit = float(np.median([w for w in raw if w > 0])) if any(raw) else 1.0
    return [w / unit for w in raw]


# A cohort's cost in member steps: each member one, plus what its members share once per batch, the
# data stream (about a tenth of a step) and an online teacher's forward (about one step, measured
# 1.0-1.2 CE steps for the cpu pair): splitting a cohort repeats them.
STREAM_COST, TEACHER_COST = 0.1, 1.0


def makespan(cohorts: list[list[int]], online: set[int], workers: int, cost: list[float] | None = None) -> float:
    """When the last of ``cohorts`` would end, taken in order by ``workers`` (each the next free one):
    how ``sweeps.run_many``'s pool runs them, in member steps (``cost`` of each run, default 1; plus
    ``STREAM_COST``, and ``TEACHER_COST`` for a cohort with a member in ``online``, the runs whose
    teacher runs in every step). A cohort with nothing left to train costs nothing."""
    free = [0.0] * workers
    for c in cohorts:
        members = sum(cost[i] for i in c) if cost is not None else len(c)
        shared = STREAM_COST + (TEACHER_COST if online & set(c) else 0.0)
        free[free.index(min(free))] += members + shared if members > 0 else 0.0
    return max(free)


def run_cohort(cfgs: list[Config]) -> list[dict]:
    """One cohort, as ``sweeps.run_many`` reports runs: ``{"run_dir", "history"}`` or ``{"error"}``."""
    out = []
    for result in distill_together(cfgs):
        if isinstance(result, Exception):
            out.append({"error": f"{type(result).__name__}: {result}"})
        else:
            out.append({"run_dir": result.run_dir, "history": result.history})
    return out
