"""Logit distillation and its command line: the logit losses, the demo, sweeps over methods.

    python train_kd.py --teacher runs/<teacher-run> --student vgg8 --method kd --T 4 --alpha 0.9
    python train_kd.py --teacher runs/<teacher-run> --method dkd --help     # DKD's options and recipe
    python train_kd.py --demo --profile cpu --data-dir ./data                # teacher vs independent vs KD

The logit losses live one per file in ``methods/`` (``kd``, ``kd_ls``, ``dkd``); the teacher and the
task around a loss in ``distiller.py``; many runs in ``sweeps.py``; cost in ``cost.py``; the demo and
the notebooks' set-up in ``experiment.py``. Everything is importable from here as before.
"""

from __future__ import annotations

import os
import sys

import pandas as pd

from analysis import cell_table, standardize
from config import Config, build_parser, config_from_args, run_cli
from cost import TensorMemory, measure_cost, state_bytes
from distiller import (
    Distiller,
    FrozenTeacher,
    build_distiller,
    check_method_inputs,
    distill,
    get_method,
    load_teacher,
    verify_teacher,
)
from distributed import init_distributed, is_main_process
from experiment import Experiment, plot_curves, run_demo, setup_experiment, teacher_config
from methods.dkd import DKDLoss, dkd_terms, kd_decomposition
from methods.kd import KD_RECIPE, KD_SOURCE, KDLoss, kd_loss, upcast
from methods.kd_ls import LogitStandardKDLoss
from pruning import Prune
from registry import METHODS, loss_methods, register_method
from runs import print_result
from sweeps import (
    RunsFailed,
    cell_runs,
    default_jobs,
    expand_grid,
    mark_best,
    parse_grid,
    parse_jobs,
    parse_seeds,
    run_all,
    run_many,
    run_seeds,
    sweep,
    sweep_grids,
)

list_methods = METHODS.names

__all__ = [
    "DKDLoss",
    "Distiller",
    "Experiment",
    "FrozenTeacher",
    "KDLoss",
    "KD_RECIPE",
    "KD_SOURCE",
    "LogitStandardKDLoss",
    "METHODS",
    "TensorMemory",
    "build_distiller",
    "check_method_inputs",
    "default_jobs",
    "distill",
    "dkd_terms",
    "expand_grid",
    "get_method",
    "kd_decomposition",
    "kd_loss",
    "list_methods",
    "load_teacher",
    "loss_methods",
    "main",
    "mark_best",
    "measure_cost",
    "parse_grid",
    "parse_seeds",
    "plot_curves",
    "register_method",
    "run_all",
    "run_demo",
    "run_many",
    "run_seeds",
    "setup_experiment",
    "standardize",
    "state_bytes",
    "sweep",
    "sweep_grids",
    "cell_runs",
    "teacher_config",
    "upcast",
    "verify_teacher",
]


def _add_cli_options(parser) -> None:
    group = parser.add_argument_group("sweep: many runs, and the demo")
    group.add_argument(
        "--demo",
        action="store_true",
        default=False,
        help="train teacher, independent and KD students; print a comparison table",
    )
    group.add_argument(
        "--sweep",
        nargs="+",
        metavar="FIELD=V1,V2",
        default=None,
        help="train every combination, e.g. --sweep T=1,2,4 kd_weight=1,3,9 (with --seeds, --jobs)",
    )
    group.add_argument("--seeds", default=None, help="seeds, alone or with --sweep: 0-2 or 0,3,5")
    group.add_argument("--jobs", default="auto", help="sweep worker processes (default auto: cores // threads)")
    group.add_argument(
        "--prune",
        nargs="?",
        const="2",
        default=None,
        metavar="MARGIN",
        help="with --sweep: stop cells behind the best on validation at 1/4 and 1/2 of the schedule by more than "
        "seed noise and MARGIN points (default 2); rerun without it to finish them",
    )


def main(argv=None):
    init_distributed()
    parser = build_parser("Distill a student from a trained teacher (or run the demo with --demo).", argv, "kd")
    _add_cli_options(parser)
    return run_cli(parser, _main, argv)


def _main(args):
    if not hasattr(args, "method"):
        args.method = "kd"  # this is the distillation command line
    cfg = config_from_args(args)
    jobs = _option("--jobs", parse_jobs, args.jobs)
    if args.demo:
        return _main_demo(cfg)
    if args.prune and not args.sweep:
        raise ValueError(f"argument --prune: stops cells of a grid; give one with --sweep (got --prune {args.prune})")
    if args.sweep or args.seeds is not None:  # --seeds alone: the one configuration over those seeds
        if cfg.name:
            raise ValueError(
                f"argument --name: a sweep trains many runs, each in a folder named for its config; "
                f"drop --name {cfg.name}"
            )
        grid = _option("--sweep", parse_grid, args.sweep) if args.sweep else {"method": [cfg.method]}
        seeds = _option("--seeds", parse_seeds, args.seeds) if args.seeds is not None else range(cfg.n_seeds)
        # every run's config checked before any starts
        _option("--sweep" if args.sweep else "--seeds", lambda g: expand_grid(cfg, g, seeds), grid)
        prune = _option("--prune", lambda m: Prune(margin=float(m)), args.prune) if args.prune else None
        return _main_sweep(cfg, grid, seeds, jobs, prune)
    result = distill(cfg)
    print_result(result)
    return result


def _option(flag: str, parse, value):
    """``parse(value)``, its error naming the option ``flag``."""
    try:
        return parse(value)
    except ValueError as err:
        raise ValueError(f"argument {flag}: {err}") from None


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


def _main_sweep(cfg: Config, grid: dict, seeds, jobs, prune: Prune | None = None) -> pd.DataFrame:
    try:
        df = sweep(cfg, grid, seeds=seeds, jobs=jobs, prune=prune)
    except RuntimeError as err:  # failed runs: a message (their folders keep what was saved), not a traceback
        if isinstance(err, RunsFailed) or hasattr(err, "results"):
            raise ValueError(str(err)) from err
        raise
    keys = df.attrs["keys"]
    print(f"\nsweep: {len(df)} runs, table: {df.attrs['path']}")
    print(cell_table(df, keys).round(2).to_string())
    if "pruned_at" in df and df["pruned_at"].notna().any():
        print("cells with pruned_at stopped there (accuracies at that epoch); rerun without --prune to finish them")
    best = df[df["best"]]
    print(
        f"\npicked on validation: {df.attrs['best']} — val top-1 {best['val_top1'].mean():.2f}, "
        f"test top-1 {best['test_top1'].mean():.2f} ± {best['test_top1'].std():.2f} (n={len(best)})"
    )
    return df


if __name__ == "__main__":
    main(sys.argv[1:])
