"""Many runs: in parallel worker processes, over seeds, over grids chosen on validation.

    results = run_seeds(cfg, range(5))                       # one config, paired seeds
    df = sweep(cfg, {"T": [1, 2, 4]}, seeds=range(3))        # a grid; df.attrs["best"] is its pick

Every run is an ordinary run folder (``runs.train``): finished ones are reused, unfinished ones
resume, so a sweep killed half-way redoes only what is missing when it is run again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import typing
from dataclasses import replace

import numpy as np
import pandas as pd

from analysis import summarize
from atomic_files import atomic_write_text
from cohorts import plan_cohorts, run_cohort
from config import Config, check_config, config_keys
from distiller import distill
from registry import resolve_recipe
from run_folders import run_dir_for, run_name
from runs import RunResult
from train_eval import progress_bars, progress_enabled


def default_jobs(threads: int) -> int:
    """Worker processes that fill this machine's cores at ``threads`` threads each (0: torch's
    default, which takes every core, so one worker: two would oversubscribe the cores, and
    OpenMP threads waiting for a descheduled peer slow each run many times over)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // (threads or cores))


def _run_in_worker(run, cfgs: list[Config]) -> list[dict]:
    """A cohort of runs (one run: ``run`` itself) without per-epoch bars (the sweep shows one bar over
    runs); the caller's setting is restored after it, so a notebook's later runs show theirs again."""
    with progress_bars(False):
        if len(cfgs) > 1:
            return run_cohort(cfgs)
        result = run(cfgs[0])
    return [{"run_dir": result.run_dir, "history": result.history}]


def run_many(
    configs: list[Config], jobs: int | str = "auto", run=None, desc: str = "runs", cohorts: bool = True
) -> list[dict]:
    """Run every config (each an ordinary run folder: finished ones are reused, unfinished resumed).

    ``jobs`` worker processes (``spawn``; ``"auto"``: cores // threads per run) share the work;
    with 1 the runs go one after the other in this process. Each run uses its own
    ``cfg.threads``, so its numbers do not depend on ``jobs``. With ``cohorts`` (and the default
    ``run``), the runs that share a data stream and a teacher train together
    (``cohorts.plan_cohorts``): the same results, the teacher's work done once. Returns, in the
    order of ``configs``, ``{"run_dir", "history"}`` or ``{"error"}`` for a run that failed; the
    others still finish. ``run`` (default ``distill``) must be importable by name.
    """
    run = run or distill
    jobs = default_jobs(max(c.threads for c in configs) if configs else 1) if jobs == "auto" else jobs
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a whole number >= 1 or 'auto', got {jobs!r}")
    from tqdm.auto import tqdm

    units = plan_cohorts(configs, jobs) if cohorts and run is distill else [[i] for i in range(len(configs))]
    out: list[dict] = [{} for _ in configs]
    bar = tqdm(total=len(configs), desc=desc, unit="run", disable=not progress_enabled())
    if jobs == 1 or len(units) <= 1:
        for unit in units:
            for i, res in zip(unit, _guarded(run, [configs[i] for i in unit]), strict=True):
                out[i] = res
            bar.update(len(unit))
        bar.close()
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_run_in_worker, run, [configs[i] for i in unit]): unit for unit in units}
        for future in as_completed(futures):
            unit = futures[future]
            try:
                results = future.result()
            except Exception as err:  # a crashed worker (BrokenProcessPool) lands here too
                results = [{"error": f"{type(err).__name__}: {err}"}] * len(unit)
            for i, res in zip(unit, results, strict=True):
                out[i] = res
            bar.update(len(unit))
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


def _guarded(run, cfgs: list[Config]) -> list[dict]:
    try:
        return _run_in_worker(run, cfgs)
    except Exception as err:
        return [{"error": f"{type(err).__name__}: {err}"}] * len(cfgs)


def _not_a_key(key: str) -> ValueError:
    return ValueError(f"grid key {key!r} is not a config field or method parameter; valid: {', '.join(config_keys())}")


def expand_grid(cfg: Config, grid: dict[str, list], seeds) -> list[tuple[dict, int, Config]]:
    """Every (cell, seed, config) of a grid, checked before anything runs.

    A cell sets the grid's Config fields; a seed sets ``seed`` and ``data_seed`` together, so
    two cells with the same seed are paired (same initialisation, same data stream).
    """
    known = config_keys()
    if not grid or any(len(list(v)) == 0 for v in grid.values()):
        raise ValueError(f"empty grid {grid!r}: give each swept field at least one value, e.g. {{'T': [1, 2, 4]}}")
    for key in grid:
        if key not in known:
            raise _not_a_key(key)
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
    cohorts: bool = True,
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
    done = run_many([c for _, _, c in runs], jobs=jobs, run=run, desc="sweep", cohorts=cohorts)
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
    hints = config_keys()
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values:
            raise ValueError(f"sweep item {item!r} is not FIELD=V1,V2,...")
        if key not in hints:
            raise _not_a_key(key)
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
