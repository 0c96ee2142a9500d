"""Which runs train together: a sweep's runs grouped into cohorts that share a stream and a teacher.

Runs of one seed see the same batches (the data seed fixes the stream); runs of one teacher would
each run it on them. ``plan_cohorts`` groups the runs that can share both into cohorts, and splits
the largest while there are more workers than cohorts, or while a split shortens the last round
(3 equal cohorts on 2 workers), so the cores stay busy; each cohort is one
``distiller.distill_together`` in one worker: the batches drawn once, the teacher run once per
batch, every member exactly as alone (weights and metrics to the bit).
"""

from __future__ import annotations

from checkpoints import file_digest
from config import Config
from distiller import distill_together, shares_a_stream
from registry import METHODS
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


def plan_cohorts(configs: list[Config], workers: int = 1) -> list[list[int]]:
    """Indices of ``configs`` grouped into cohorts, in the order of their first member.

    Runs that cannot share (a method with a runner of its own) stay alone. Runs without a teacher
    join the largest cohort of their stream. While there are fewer cohorts than ``workers``, the
    largest is split in two (each part runs its own teacher): fewer shared forwards, busier cores;
    then again while that shortens the last round (``makespan``).
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
    while len(cohorts) < workers and max(len(c) for c in cohorts) > 1:
        cohorts = _split_largest(cohorts)
    cohorts = sorted(cohorts, key=lambda c: c[0])
    # a last round that leaves workers idle (3 equal cohorts on 2 workers): split while that shortens it
    while workers > 1 and max(len(c) for c in cohorts) > 1:
        finer = sorted(_split_largest(cohorts), key=lambda c: c[0])
        if makespan(finer, online, workers) >= makespan(cohorts, online, workers):
            break
        cohorts = finer
    return cohorts


def _split_largest(cohorts: list[list[int]]) -> list[list[int]]:
    largest = max(cohorts, key=len)
    rest = [c for c in cohorts if c is not largest]
    return rest + [largest[: len(largest) // 2], largest[len(largest) // 2 :]]


# A cohort's cost in member steps: each member one, plus what its members share once per batch, the
# data stream (about a tenth of a step) and an online teacher's forward (about one step, measured
# 1.0-1.2 CE steps for the cpu pair): splitting a cohort repeats them.
STREAM_COST, TEACHER_COST = 0.1, 1.0


def makespan(cohorts: list[list[int]], online: set[int], workers: int) -> float:
    """When the last of ``cohorts`` would end, taken in order by ``workers`` (each the next free one):
    how ``sweeps.run_many``'s pool runs them, in member steps (``STREAM_COST``, and ``TEACHER_COST``
    for a cohort with a member in ``online``, the runs whose teacher runs in every step)."""
    free = [0.0] * workers
    for c in cohorts:
        free[free.index(min(free))] += len(c) + STREAM_COST + (TEACHER_COST if online & set(c) else 0.0)
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
