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
import re
import signal
import sys
import threading
import time
import typing
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import pandas as pd

from analysis import FAILED, failed_rows, history_minutes, summarize
from atomic_files import atomic_write_text
from cohorts import plan_cohorts, run_cohort
from config import Config, check_config, config_keys
from distiller import distill, shares_a_stream, teacher_checks
from progress import progress_bars, progress_enabled
from pruning import Prune, prune_runs
from registry import METHODS, resolve_recipe
from run_folders import failure_mark, run_dir_for, run_name
from run_records import RunRecords
from runs import RunResult


def default_jobs(threads: int) -> int:
    """Worker processes that fill this machine's cores at ``threads`` threads each (0: torch's
    default, which takes every core, so one worker: two would oversubscribe the cores, and
    OpenMP threads waiting for a descheduled peer slow each run many times over)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // (threads or cores))


class RunsFailed(RuntimeError):
    """Some runs of a batch failed (the others finished; their folders keep what was saved)."""


def _run_in_worker(run, cfgs: list[Config]) -> list[dict]:
    """A cohort of runs (one run: ``run`` itself) without per-epoch bars (the sweep shows one bar over
    runs); the caller's setting is restored after it, so a notebook's later runs show theirs again."""
    with progress_bars(False):
        if len(cfgs) > 1:
            return run_cohort(cfgs)
        result = run(cfgs[0])
    return [{"run_dir": result.run_dir, "history": result.history}]


def _worker_init(parent: int) -> None:
    """Every worker process dies with the process that started it: killed with ``kill -9``, a
    sweep's parent cannot reap its workers, which would train on (for no one) and then hang.

    On Linux the kernel kills the worker when its parent dies (``PR_SET_PDEATHSIG``); everywhere a
    watcher thread also ends it when its parent's end of the pipe closes (or, without one, when
    ``os.getppid`` changes). A worker whose parent died while it was starting (importing) ends here.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # the watcher below still ends the worker
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()


def _watch_parent(parent: int) -> None:
    """End this process once ``parent`` is gone (what was saved is kept: every file is written atomically)."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    proxy = mp.parent_process()
    if proxy is not None and proxy.pid == parent and proxy.sentinel is not None:
        wait([proxy.sentinel])  # readable once the parent has exited
    else:
        while os.getppid() == parent:
            time.sleep(1.0)
    os._exit(1)


def run_many(
    configs: list[Config],
    jobs: int | str = "auto",
    run=None,
    desc: str = "runs",
    cohorts: bool = True,
    method_cost: Mapping[str, float] | None = None,
) -> list[dict]:
    """Run every config (each an ordinary run folder: finished ones are reused, unfinished resumed).

    ``jobs`` worker processes (``spawn``; ``"auto"``: cores // threads per run) share the work;
    with 1 the runs go one after the other in this process. Each run uses its own
    ``cfg.threads``, so its numbers do not depend on ``jobs``. With ``cohorts`` (and the default
    ``run``), the runs that share a data stream and a teacher train together
    (``cohorts.plan_cohorts``): the same results, the teacher's work done once. Returns, in the
    order of ``configs``, ``{"run_dir", "history"}`` or ``{"error"}`` for a run that failed; the
    others still finish. ``run`` (default ``distill``) must be importable by name. ``method_cost``: each
    method's step relative to CE's, measured, to balance the workers (``cohorts.work_left``).

    With ``distill``, each teacher is checked here, once, before any worker starts (the workers
    read the stored check). A worker process that dies (killed, out of memory) breaks its pool:
    the runs it took down with it, the dead worker's included, are run again in a fresh pool and,
    if that breaks too, each in a process of its own, so only a run whose own process died is
    reported as failed; each resumes from its last finished epoch. Workers die with this process.
    """
    run = run or distill
    if configs and all(METHODS.get(c.method).run is run and shares_a_stream(c) for c in configs):
        run = distill  # the methods' own runner, which distill calls; through distill they join cohorts
    jobs = default_jobs(max(c.threads for c in configs) if configs else 1) if jobs == "auto" else jobs
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a whole number >= 1 or 'auto', got {jobs!r}")
    if not configs:  # e.g. a notebook's list of pruned cells where nothing was pruned
        return []
    if run is distill:
        teacher_checks(configs)  # once here, not once in every worker
    from tqdm.auto import tqdm

    alone = [[i] for i in range(len(configs))]
    units = plan_cohorts(configs, jobs, method_cost) if cohorts and run is distill else alone
    out: list[dict] = [{} for _ in configs]
    bar = tqdm(total=len(configs), desc=desc, unit="run", disable=not progress_enabled())
    if jobs == 1 or len(units) <= 1:
        for unit in units:
            for i, res in zip(unit, _guarded(run, [configs[i] for i in unit]), strict=True):
                out[i] = res
            bar.update(len(unit))
        bar.close()
        return out
    todo = _pool_round(run, configs, units, jobs, out, bar)
    if sum(map(len, todo)) > 1:  # the runs a dead worker took down with its pool: again, in a fresh one
        _rerun_note(desc, todo, "a fresh pool")
        todo = _pool_round(run, configs, todo, jobs, out, bar)
    if todo:  # each run in a process of its own: a death is then that run's own
        _rerun_note(desc, todo, "a process of its own each")
        _isolated_round(run, configs, [i for unit in todo for i in unit], jobs, out, bar)
    bar.close()
    return out


def _rerun_note(desc: str, todo: list[list[int]], where: str) -> None:
    print(
        f"{desc}: a worker process died, taking down its pool; its {sum(map(len, todo))} unfinished run(s) (running or "
        f"waiting) go again in {where}, each resuming from its last finished epoch",
        file=sys.stderr,
    )


def _pool_round(run, configs: list[Config], todo: list[list[int]], jobs: int, out: list[dict], bar) -> list[list[int]]:
    """Run the units of ``todo`` (a cohort's runs, or one run) in one pool of ``jobs`` workers; returns
    the units lost because the pool broke."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    lost = []
    ctx = mp.get_context("spawn")
    workers = min(jobs, len(todo))
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),)) as pool:
        futures = {}
        for unit in todo:
            try:
                futures[pool.submit(_run_in_worker, run, [configs[i] for i in unit])] = unit
            except BrokenProcessPool:
                lost.append(unit)
        for future in as_completed(futures):
            unit = futures[future]
            try:
                results = future.result()
            except BrokenProcessPool:  # not these runs' fault: a worker (maybe another's) died
                lost.append(unit)
                continue
            except Exception as err:
                results = [{"error": f"{type(err).__name__}: {err}"}] * len(unit)
            for i, res in zip(unit, results, strict=True):
                out[i] = res
            bar.update(len(unit))
    return sorted(lost)


def _isolated_round(run, configs: list[Config], todo: list[int], jobs: int, out: list[dict], bar) -> None:
    """Each run of ``todo`` in a process of its own (``jobs`` at a time): a death is that run's."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> None:
        out[i] = _run_isolated(run, configs[i])
        bar.update(1)

    with ThreadPoolExecutor(jobs) as threads:
        list(threads.map(one, todo))


def _run_isolated(run, cfg: Config) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_isolated_main, args=(send, os.getpid(), run, cfg), daemon=True)
    process.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:  # the process died without answering
        result = None
    process.join()
    receive.close()
    if result is not None:
        return result
    code = process.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
    return {"error": f"its process died ({how}) while it trained: rerun to resume it from its last finished epoch"}


def _isolated_main(send, parent: int, run, cfg: Config) -> None:
    _worker_init(parent)
    send.send(_guarded(run, [cfg])[0])
    send.close()


def run_all(configs: list[Config], jobs: int | str = "auto", desc: str = "runs") -> list[RunResult]:
    """``run_many``, then every result read back (``RunResult``, in order); raises ``RunsFailed``
    (a ``RuntimeError``) if a run failed."""
    done = run_many(configs, jobs=jobs, desc=desc)
    failed = [f"{run_name(c)}: {d['error']}" for c, d in zip(configs, done, strict=True) if "error" in d]
    if failed:
        raise RunsFailed(
            f"{len(failed)} of {len(configs)} runs failed (the others finished; rerun to redo only those):\n  "
            + "\n  ".join(failed)
        )
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


def grid_fields(grid: dict[str, list]) -> list[str]:
    """The Config fields a grid sets, in order: a joined key (``"ce_weight,kd_weight"``) gives each of its fields."""
    return [field.strip() for key in grid for field in key.split(",")]


def _cells(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's axes; a joined key's values are tuples that set its fields together."""
    axes = []
    for key, values in grid.items():
        fields = [f.strip() for f in key.split(",")]
        if len(fields) == 1:
            axes.append([{fields[0]: v} for v in values])
            continue
        for v in values:
            if not isinstance(v, (tuple, list)) or len(v) != len(fields):
                raise ValueError(
                    f"grid axis {key!r} sets {len(fields)} fields together: give each value as a tuple of "
                    f"{len(fields)}, e.g. {{{key!r}: [{tuple(range(len(fields)))}]}}; got {v!r}"
                )
        axes.append([dict(zip(fields, v, strict=True)) for v in values])
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]


def expand_grid(cfg: Config, grid: dict[str, list], seeds) -> list[tuple[dict, int, Config]]:
    """Every (cell, seed, config) of a grid, checked before anything runs.

    A cell sets the grid's Config fields; a key joining several fields with commas
    (``{"ce_weight,kd_weight": [(0.5, 0.5), (0.0, 1.0)]}``) sets them together, one tuple per
    value. A seed sets ``seed`` and ``data_seed`` together, so two cells with the same seed are
    paired (same initialisation, same data stream).
    """
    known = config_keys()
    if not grid or any(len(list(v)) == 0 for v in grid.values()):
        raise ValueError(f"empty grid {grid!r}: give each swept field at least one value, e.g. {{'T': [1, 2, 4]}}")
    fields = grid_fields(grid)
    for key in fields:
        if key not in known:
            raise _not_a_key(key)
        if key in ("seed", "data_seed"):
            raise ValueError("seeds are not a grid field: pass seeds=... (each seed sets seed and data_seed)")
    if len(set(fields)) != len(fields):
        raise ValueError(f"grid {list(grid)} sets a field twice: give each field one axis")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("no seeds: pass seeds=range(3) or similar")
    out = []
    for cell in _cells(grid):
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
    prune: Prune | None = None,
    extend: dict[str, float] | None = None,
    max_extensions: int = 2,
    record: str | None = None,
) -> pd.DataFrame:
    """Train every cell of ``grid`` × ``seeds`` (in parallel) and return one row per run.

    Rows carry the cell's values, the seed, the run folder, last-epoch ``val_top1``/``val_loss``
    and ``test_top1``/``test_top5``, and the epoch of best validation accuracy with the test
    accuracy there. The cell whose mean ``best_by`` over seeds is highest is marked in column
    ``best`` and in ``df.attrs["best"]``; choose on validation columns, report test for that cell.
    Runs without ``threads`` set use 1 thread each. Runs that raised are reported together at
    the end (their folders keep what was saved); run the same sweep again to redo only those.
    A run that trained but failed (still at chance, or diverged: its folder's ``FAILED`` mark) is
    a result, not an error: its row's ``failed`` column says why; ``analysis.cell_table`` shows
    each cell's failed runs (count and seeds) beside its mean, ``df.attrs["failed"]`` lists them
    per cell, and only cells none of whose runs failed can be picked (``mark_best``).
    Each run is an ordinary, independent command, so a cluster can take them instead
    (``python train_kd.py --sweep ... --jobs 1`` per array task, or ``run_many`` under submitit).

    With ``prune`` (a ``pruning.Prune``), cells far behind the best on validation stop at a rung
    (``pruning.py`` states the rule); their rows stay, with the epoch in column ``pruned_at``, and
    they cannot be picked. The same sweep without ``prune`` resumes them to the end.

    ``extend`` (``{"T": 2.0}``): axes whose pick must not sit on the edge of the values tried. When
    the picked value is the largest (smallest) tried, the axis gets the value times (divided by)
    its factor, for every cell of the other axes, and the pick is made again; at most
    ``max_extensions`` times per axis. The rows then cover the extended grid, and
    ``df.attrs["extended"]`` lists the values each axis gained (a pick still on an edge after
    ``max_extensions`` is said in ``attrs["edge"]``).

    ``record`` (a CSV path, ``run_records.py``): runs found there are read back instead of trained,
    in every batch (pruning rungs included), with their provenance in column ``recorded``; every run
    trained here is added to it. A grid trained in one session is so picked again, identically, in
    the next on a machine without its run folders.
    """
    extend = {"": extend or {}}
    return sweep_grids({"": (cfg, grid)}, seeds, jobs, best_by, run, cohorts, prune, extend, max_extensions, record)[""]


def sweep_grids(
    grids: dict[str, tuple[Config, dict[str, list]]],
    seeds=range(3),
    jobs: int | str = "auto",
    best_by: str = "val_top1",
    run=None,
    cohorts: bool = True,
    prune: Prune | None = None,
    extend: dict[str, dict[str, float]] | None = None,
    max_extensions: int = 2,
    record: str | None = None,
) -> dict[str, pd.DataFrame]:
    """Several ``sweep``s trained together: ``{"at": (at_cfg, {"feat_weight": [...]}), ...}`` → one
    table per name, each as ``sweep`` returns it (its own pick, pruning and edge extension).

    Every batch (each pruning rung, the rest, each round of extensions) is one ``run_many`` call over
    all grids, so runs of different grids that share a teacher and a data stream train as one
    cohort, and the workers stay busy across grids. Pruning judges each grid's cells against that
    grid's own best. ``extend`` maps a grid's name to its axes and factors (``{"at": {"feat_weight": 3}}``);
    ``record`` is ``sweep``'s, one file for all the grids.
    """
    grids = {name: (cfg, {k: list(v) for k, v in grid.items()}) for name, (cfg, grid) in grids.items()}
    extend = {name: axes for name, axes in (extend or {}).items() if axes}
    for name, axes in extend.items():
        if name not in grids:
            raise ValueError(f"extend names {name!r}, which is not one of the grids: {', '.join(grids)}")
        for axis in axes:
            if axis not in grids[name][1] or "," in axis:
                raise ValueError(
                    f"extend={axes!r}: {axis!r} is not a single-field axis of the grid {list(grids[name][1])}"
                )
    added = {name: {axis: [] for axis in axes} for name, axes in extend.items()}
    records = RunRecords(record) if record else None
    while True:
        out = _sweep_grids(grids, seeds, jobs, best_by, run, cohorts, prune, records)
        nxt = {
            name: {a: _past_edge(grids[name][1][a], out[name].attrs["best"][a], f) for a, f in axes.items()}
            for name, axes in extend.items()
        }
        grow = [
            (name, a, v)
            for name, axes in nxt.items()
            for a, v in axes.items()
            if v is not None and len(added[name][a]) < max_extensions
        ]
        if not grow:
            break
        for name, axis, value in grow:
            grids[name][1][axis].append(value)
            added[name][axis].append(value)
    for name, df in out.items():
        df.attrs["extended"] = added.get(name, {})
        df.attrs["edge"] = {a: df.attrs["best"][a] for a, v in nxt.get(name, {}).items() if v is not None}
    return out


def _past_edge(values: list, pick, factor: float):
    """The value one step past ``pick`` when it is the largest or smallest of ``values``, else None."""
    if pick == max(values):
        return float(pick) * factor
    if pick == min(values):
        return float(pick) / factor
    return None


def _sweep_grids(grids, seeds, jobs, best_by, run, cohorts, prune, records=None) -> dict[str, pd.DataFrame]:
    runs = [
        (name, cell, seed, c) for name, (cfg, grid) in grids.items() for cell, seed, c in expand_grid(cfg, grid, seeds)
    ]

    def batch(cfgs, desc):
        return recorded_batch(
            records, cfgs, lambda todo: run_many(todo, jobs=jobs, run=run, desc=desc, cohorts=cohorts)
        )

    stopped, partial = {}, {}
    if prune is not None:
        if any(not cfg.val_size for cfg, _ in grids.values()):
            raise ValueError("pruning decides on validation: set val_size > 0 (the cpu profile holds out 5,000)")
        # one key for any grid's cells: grids may sweep different fields
        cells = [({"grid": name, "cell": json.dumps(cell, sort_keys=True)}, seed, c) for name, cell, seed, c in runs]
        stopped, partial = prune_runs(cells, prune, lambda cfgs: batch(cfgs, "sweep (to a rung)"), by=("grid",))
    todo = [i for i in range(len(runs)) if i not in partial]
    done = dict(partial) | dict(zip(todo, batch([runs[i][3] for i in todo], "sweep"), strict=True))
    out, failed = {}, []
    for name, (cfg, grid) in grids.items():
        mine = [i for i, r in enumerate(runs) if r[0] == name]
        rows = [_sweep_row(runs[i][1], runs[i][2], runs[i][3], done[i], stopped.get(i), prune, failed) for i in mine]
        df = pd.DataFrame(rows)
        if prune is not None:
            df.attrs["prune"] = {"rungs": prune.epochs(cfg.epochs), "margin": prune.margin}
        _write_sweep(cfg, grid, df)
        out[name] = df
    if failed:
        err = RunsFailed(
            f"{len(failed)} of {len(runs)} runs failed (the others finished; rerunning the sweep redoes only "
            "the missing ones):\n  " + "\n  ".join(failed)
        )
        err.results = out[""] if list(out) == [""] else out
        raise err
    for name, (_, grid) in grids.items():
        out[name] = mark_best(out[name], grid_fields(grid), best_by)
        out[name].attrs["keys"] = grid_fields(grid)
    return out


def recorded_batch(records: RunRecords | None, cfgs: list[Config], train) -> list[dict]:
    """``train(cfgs)``'s results, with the runs ``records`` holds read from it and the others added to it
    (no record: ``train(cfgs)``)."""
    if records is None:
        return train(cfgs)
    out = [records.lookup(c) for c in cfgs]
    todo = [i for i, res in enumerate(out) if res is None]
    if todo:
        for i, res in zip(todo, train([cfgs[i] for i in todo]), strict=True):
            out[i] = res
            if "history" in res:
                records.add(cfgs[i], res["history"], res["run_dir"])
        records.save()  # after each batch: a session that ends mid-grid keeps every batch it finished
    return out


def _sweep_row(cell: dict, seed: int, run_cfg: Config, res: dict, stopped, prune, failed: list) -> dict:
    """One run's row of a sweep table; a run that raised (not a marked failure) is added to ``failed``."""
    row = {**cell, "seed": seed, "threads": run_cfg.threads}
    if prune is not None:
        row["pruned_at"] = np.nan if stopped is None else stopped
    if "error" in res and failure_mark(run_dir_for(run_cfg)):  # diverged: the run's result is a failure
        return {**row, "run_dir": run_dir_for(run_cfg), FAILED: failure_mark(run_dir_for(run_cfg))}
    if "error" in res:
        failed.append(f"{run_name(run_cfg)}: {res['error']}")
        return {**row, "run_dir": run_dir_for(run_cfg), "error": res["error"]}
    recorded = {"recorded": res["recorded"]} if "recorded" in res else {}
    return {**row, "run_dir": res["run_dir"], **run_metrics(_to_rung(res["history"], stopped)), **recorded}


def _to_rung(history: pd.DataFrame, stopped) -> pd.DataFrame:
    """A stopped run's history up to the epoch it stopped at, without test: what pruning judged, even
    where its folder was later resumed to the end (a check of the rule, or a user's ``run_seeds`` on the
    cell), whose test read at its validation-best epoch may fall before the rung."""
    if stopped is None or pd.isna(stopped):
        return history
    test = [c for c in history.columns if c.startswith("test_")]
    return history[history["epoch"] <= stopped].drop(columns=test).reset_index(drop=True)


def cell_runs(
    df: pd.DataFrame, cfg: Config, cell: dict, jobs: int | str = "auto", record: str | None = None
) -> list[RunResult]:
    """The runs of one cell of a sweep's table (``cfg`` its base), read back as ``run_seeds`` gives
    them, one per seed; a cell that pruning stopped is read at the epoch it stopped, not trained on (its
    history ends there; its model is the folder's, later than that where the run was since resumed).
    Rows the sweep read from ``record`` (column ``recorded``) come back from it with their metrics
    and no weights (``model`` None): their folders are on the machine that trained them."""
    rows = df[np.logical_and.reduce([df[k] == v for k, v in cell.items()])] if cell else df.iloc[0:0]
    if rows.empty:
        cells = df[df.attrs.get("keys", list(cell))].drop_duplicates().to_dict("records")
        raise ValueError(f"no cell {cell} in this sweep; its cells: {cells}")
    stop = rows["pruned_at"].max() if "pruned_at" in rows else np.nan
    base = replace(cfg, **cell, **({} if pd.isna(stop) else {"stop_after": int(stop)}))
    seeds = sorted(rows["seed"])
    if record is None or "recorded" not in rows or rows["recorded"].isna().all():
        return [replace(r, history=_to_rung(r.history, stop)) for r in run_seeds(base, seeds, jobs)]
    records = RunRecords(record)
    cfgs = [replace(base, seed=s, data_seed=s, name="", threads=base.threads or 1) for s in seeds]
    found = [records.lookup(c) for c in cfgs]
    if any(f is None for f in found):
        raise ValueError(f"the record {record} no longer holds every run of the cell {cell}: sweep again")
    return [RunResult(None, f["history"], f["run_dir"], c) for f, c in zip(found, cfgs, strict=True)]


def run_metrics(history: pd.DataFrame) -> dict:
    s = summarize(history)
    last = history.iloc[-1]
    return {
        "val_top1": last.get("val_top1", float("nan")),
        "val_loss": last.get("val_loss", float("nan")),
        "test_top1": last.get("test_top1", float("nan")),  # a run stopped early never read test
        "test_top5": last.get("test_top5", float("nan")),
        "best_epoch": s["best_epoch"],
        "test_top1_at_best": s["best_top1"],
        "minutes": s["train_seconds"] / 60,
        "minutes_alone": history_minutes(history),
    } | ({FAILED: s[FAILED]} if FAILED in s else {})


def mark_best(df: pd.DataFrame, keys: list[str], by: str = "val_top1") -> pd.DataFrame:
    """Mark the rows of the cell with the highest mean ``by`` over seeds (``best`` column, ``attrs``).

    Only cells none of whose runs failed (column ``failed``) can be picked; ``attrs["failed"]``
    maps each cell with failed runs (``"T=1, kd_weight=3"``) to their ``count`` and ``seeds``."""
    if by not in df:
        raise ValueError(f"best_by={by!r} is not a column of the sweep; columns: {', '.join(df.columns)}")
    failed = failed_rows(df)
    cells = df.set_index(keys).index
    spoilt = cells.isin(cells[failed.to_numpy()])  # every run of a cell in which any run failed
    if "pruned_at" in df:  # stopped early: its accuracy is from part of the schedule
        spoilt |= cells.isin(cells[df["pruned_at"].notna().to_numpy()])
    if df.loc[~spoilt, by].isna().all():
        if failed.any():
            raise ValueError(
                f"every cell of the sweep has a failed run ({int(failed.sum())} of {len(df)} runs failed: "
                f"{', '.join(_cell_failures(df, keys, failed))}): there is no cell to pick"
            )
        raise ValueError(f"no run has {by!r} (val_size=0 means no validation split to choose on)")
    means = df[~spoilt].groupby(keys, dropna=False)[by].mean()
    best = means.idxmax()
    best = dict(zip(keys, best if isinstance(best, tuple) else (best,), strict=True))
    df = df.copy()
    df["best"] = np.logical_and.reduce([df[k] == v for k, v in best.items()])
    df.attrs["best"] = best
    df.attrs["best_by"] = by
    df.attrs["failed"] = _cell_failures(df, keys, failed)
    return df


def _cell_failures(df: pd.DataFrame, keys: list[str], failed: pd.Series) -> dict[str, dict]:
    """``{"T=1": {"count": 2, "seeds": [0, 2]}}``: each cell's failed runs."""
    out = {}
    for values, rows in df[failed.to_numpy()].groupby(keys, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        label = ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
        out[label] = {"count": len(rows), "seeds": sorted(rows["seed"]) if "seed" in rows else []}
    return out


def _write_sweep(cfg: Config, grid: dict, df: pd.DataFrame) -> None:
    """The sweep's table as data: ``<out_dir>/sweeps/<digest>.csv`` beside the run folders."""
    key = json.dumps({"base": run_name(replace(cfg, name="")), "grid": grid}, sort_keys=True, default=str)
    path = os.path.join(cfg.out_dir, "sweeps", f"sweep-{hashlib.sha1(key.encode()).hexdigest()[:8]}.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, df.to_csv(index=False))
    df.attrs["path"] = path


# fields a grid cannot sweep: they say where and under what name, not what is computed
NOT_SWEPT = ("profile", "name", "out_dir", "seed", "data_seed")


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["T=1,2,4", "kd_weight=1,3,9"]`` → ``{"T": [1.0, 2.0, 4.0], "kd_weight": [1.0, 3.0, 9.0]}``.

    Each value is converted to its field's type (booleans: true/false, yes/no, 1/0); a field
    given twice, a value given twice or one of the wrong type is refused, naming the item."""
    hints = config_keys()
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not values.strip():
            raise ValueError(f"{item!r} is not FIELD=V1,V2,... (e.g. T=1,2,4)")
        if key in ("seed", "data_seed"):
            raise ValueError(f"{item!r}: seeds are not a grid field; give them with --seeds (e.g. --seeds 0-2)")
        if key not in hints:
            raise ValueError(f"{item!r}: {_not_a_key(key)}")
        if key in NOT_SWEPT:
            raise ValueError(f"{item!r}: {key} says where runs go, not what they compute; it cannot be swept")
        if key in grid:
            raise ValueError(f"{item!r}: {key} is swept twice; give all its values in one item ({key}=V1,V2,...)")
        tp = hints[key]
        if type(None) in typing.get_args(tp):  # ``float | None``
            tp = next(t for t in typing.get_args(tp) if t is not type(None))
        cast = _caster(key, tp, item)
        grid[key] = [cast(v.strip()) for v in values.split(",")]
        repeated = sorted({str(v) for v in grid[key] if grid[key].count(v) > 1})
        if repeated:
            raise ValueError(f"{item!r}: {key}={', '.join(repeated)} is given twice (it would train the same runs)")
    return grid


def _caster(key: str, tp, item: str):
    """The function that turns one command-line value of field ``key`` (type ``tp``) into its value."""
    if tp not in (bool, int, float, str):
        raise ValueError(f"{item!r}: {key} holds a list; it cannot be swept from the command line")
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    kind = {bool: "true or false", int: "a whole number", float: "a number", str: "a value"}[tp]

    def cast(text: str):
        try:
            if not text:
                raise ValueError
            return words[text.lower()] if tp is bool else tp(text)
        except (ValueError, KeyError):
            raise ValueError(f"{item!r}: {text!r} is not {kind} ({key} takes {kind})") from None

    return cast


_SEEDS = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


def parse_seeds(text: str) -> list[int]:
    """``"0-2"`` → [0, 1, 2]; ``"0,3,5"`` → [0, 3, 5]; whole numbers >= 0, each once."""
    seeds: list[int] = []
    for part in text.split(","):
        match = _SEEDS.fullmatch(part)
        if match is None:
            raise ValueError(
                f"seeds {text!r}: {part.strip()!r} is not a seed (a whole number >= 0) or a range LOW-HIGH; "
                "write e.g. 0-2 or 0,3,5"
            )
        lo, hi = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if hi < lo:
            raise ValueError(f"seeds {text!r}: the range {part.strip()!r} is empty; write LOW-HIGH with LOW <= HIGH")
        for seed in range(lo, hi + 1):
            if seed in seeds:
                raise ValueError(f"seeds {text!r}: seed {seed} is given twice (it would train the same runs)")
            seeds.append(seed)
    return seeds


def parse_jobs(text: str) -> int | str:
    """``"auto"`` or a whole number >= 1 (the ``--jobs`` option)."""
    if text.strip() == "auto":
        return "auto"
    try:
        jobs = int(text)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise ValueError(f"jobs {text!r}: give a whole number of worker processes >= 1, or auto")
    return jobs
