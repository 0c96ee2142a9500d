"""Which runs train together: a sweep's runs grouped into cohorts that share a stream and a teacher.

Runs of one seed see the same batches (the data seed fixes the stream); runs of one teacher would
each run it on them. ``plan_cohorts`` groups the runs that can share both into cohorts, and splits
the largest while there are more workers than cohorts, so the cores stay busy; each cohort is one
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
    largest is split in two (each part runs its own teacher): fewer shared forwards, busier cores.
    """
    groups: dict[tuple, list[int]] = {}
    alone: list[list[int]] = []
    for i, cfg in enumerate(configs):
        if shares_a_stream(cfg):
            groups.setdefault((stream_key(cfg), teacher_key(cfg)), []).append(i)
        else:
            alone.append([i])
    for stream, teacher in list(groups):
        if teacher is None:
            hosts = [k for k in groups if k[0] == stream and k[1] is not None]
            if hosts:
                groups[max(hosts, key=lambda k: len(groups[k]))] += groups.pop((stream, teacher))
    cohorts = [sorted(m) for m in groups.values()] + alone
    while len(cohorts) < workers and max(len(c) for c in cohorts) > 1:
        largest = max(cohorts, key=len)
        cohorts.remove(largest)
        cohorts += [largest[: len(largest) // 2], largest[len(largest) // 2 :]]
    return sorted(cohorts, key=lambda c: c[0])


def run_cohort(cfgs: list[Config]) -> list[dict]:
    """One cohort, as ``sweeps.run_many`` reports runs: ``{"run_dir", "history"}`` or ``{"error"}``."""
    out = []
    for result in distill_together(cfgs):
        if isinstance(result, Exception):
            out.append({"error": f"{type(result).__name__}: {result}"})
        else:
            out.append({"run_dir": result.run_dir, "history": result.history})
    return out
