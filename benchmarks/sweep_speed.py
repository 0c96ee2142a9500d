"""What the sweep engine saves: cohorts, and the test set read only where it is used; side by side.

    python benchmarks/sweep_speed.py            # cpu profile, real CIFAR-10 (several minutes on 2 cores)
    python benchmarks/sweep_speed.py --quick    # smoke profile, generated data: checks the script itself

Rows (written to benchmarks/sweep_speed.json):
- runs/hour of a grid of online-teacher feature cells x 2 seeds, ``jobs`` workers: cohorts (one
  teacher forward per batch per cohort) vs today's one run per worker; the results must be equal;
- the same grid with the teacher under bf16 autocast, cohorts vs one run at a time;
- one member's share of a cohort's epoch as the cohort grows (1, 2, 4, ... members), relative to
  one CE run's epoch: the teacher's share should fall as 1/K;
- runs/hour of a cached-KD grid (T x KD weight, 2 seeds) with the test set read at the end (and at
  the epoch validation picks) vs every epoch; the training columns must be equal;
- a cached-KD grid with clearly bad cells (learning rates 0.05, 0.1, 0.005, 0.0005; 3 seeds), pruned
  (``pruning.Prune()``) vs trained in full: its cost and whether the pick is the same.
Each comparison trains fresh run folders in a temporary directory; run it on an otherwise idle
machine (a 2-thread job beside another busy process slows many times over).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cost import processor  # noqa: E402
from distiller import distill, distill_together  # noqa: E402
from pruning import Prune  # noqa: E402
from run_records import code_commit  # noqa: E402
from train_eval import TIMING_COLUMNS, make_config, train  # noqa: E402
from train_kd import sweep, teacher_config  # noqa: E402

CELLS = {"method": ["fitnet", "at", "sp", "rkd"], "feat_weight": [1.0, 10.0]}  # 8 online-teacher cells


def base_config(args, out_dir: str):
    if args.quick:
        cfg = make_config("smoke", out_dir=out_dir, epochs=1, threads=1)
    else:
        cfg = make_config("cpu", data_dir=args.data_dir, out_dir=out_dir, epochs=args.epochs, subset=args.subset)
    # the grids' speed is what is measured: every cell reads the test set as the default says, unless a row sets it
    return cfg


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def grid_row(args, teacher: str, teacher_amp: str) -> dict:
    """Runs/hour of the grid in cohorts vs one run per worker, each in a fresh folder; equal results."""
    seconds, tables = {}, {}
    for name, cohorts in (("one by one", False), ("cohorts", True)):
        with tempfile.TemporaryDirectory() as out:
            cfg = replace(base_config(args, out), teacher=teacher, teacher_amp=teacher_amp, method="at")
            seconds[name], tables[name] = timed(
                lambda cfg=cfg, cohorts=cohorts: sweep(cfg, CELLS, seeds=range(2), jobs=args.jobs, cohorts=cohorts)
            )
    runs = len(tables["cohorts"])
    same = all(tables["cohorts"][c].tolist() == tables["one by one"][c].tolist() for c in ("val_top1", "test_top1"))
    return {
        "runs": runs,
        "jobs": args.jobs,
        "teacher_amp": teacher_amp,
        "minutes_one_by_one": seconds["one by one"] / 60,
        "minutes_cohorts": seconds["cohorts"] / 60,
        "runs_per_hour_one_by_one": runs * 3600 / seconds["one by one"],
        "runs_per_hour_cohorts": runs * 3600 / seconds["cohorts"],
        "speedup": seconds["one by one"] / seconds["cohorts"],
        "results_identical": bool(same),
    }


def test_reading_row(args, teacher: str) -> dict:
    """Runs/hour of a cached-KD grid, test read at the end vs every epoch (both in cohorts)."""
    grid = {"T": [2.0, 4.0], "kd_weight": [0.9, 9.0]}
    seconds, tables = {}, {}
    for when in ("every", "end"):
        with tempfile.TemporaryDirectory() as out:
            cfg = replace(base_config(args, out), teacher=teacher, method="kd", teacher_cache=True, eval_test=when)
            cfg = replace(cfg, epochs=args.reading_epochs)
            seconds[when], tables[when] = timed(lambda cfg=cfg: sweep(cfg, grid, seeds=range(2), jobs=args.jobs))
    same = all(tables["end"][c].tolist() == tables["every"][c].tolist() for c in ("val_top1", "test_top1"))
    runs = len(tables["end"])
    return {
        "runs": runs,
        "epochs": args.reading_epochs,
        "minutes_test_every_epoch": seconds["every"] / 60,
        "minutes_test_at_end": seconds["end"] / 60,
        "speedup": seconds["every"] / seconds["end"],
        "results_identical": bool(same),
    }


def pruning_row(args, teacher: str) -> dict:
    """A grid with clearly bad cells, pruned on validation vs trained in full (both in cohorts)."""
    grid = {"lr": [0.05, 0.1, 0.005, 0.0005]}
    seconds, tables = {}, {}
    for name, prune in (("full", None), ("pruned", Prune())):
        with tempfile.TemporaryDirectory() as out:
            cfg = replace(base_config(args, out), teacher=teacher, method="kd", teacher_cache=True)
            cfg = replace(cfg, epochs=args.prune_epochs)
            seconds[name], tables[name] = timed(
                lambda cfg=cfg, prune=prune: sweep(cfg, grid, seeds=range(3), jobs=args.jobs, prune=prune)
            )
    pruned = tables["pruned"]
    stopped = pruned[pruned["pruned_at"].notna()]
    return {
        "runs": len(pruned),
        "epochs": args.prune_epochs,
        "rungs": pruned.attrs["prune"]["rungs"],
        "margin": pruned.attrs["prune"]["margin"],
        "stopped": {str(k): int(v) for k, v in stopped.groupby("lr")["pruned_at"].first().items()},
        "minutes_full": seconds["full"] / 60,
        "minutes_pruned": seconds["pruned"] / 60,
        "cost_pruned_over_full": seconds["pruned"] / seconds["full"],
        "pick_full": {k: float(v) for k, v in tables["full"].attrs["best"].items()},
        "pick_pruned": {k: float(v) for k, v in pruned.attrs["best"].items()},
        "same_pick": tables["full"].attrs["best"] == pruned.attrs["best"],
    }


def member_share(args, teacher: str) -> list[dict]:
    """One member's share of a cohort epoch (its wall time / K) against one CE run's epoch, K = 1, 2, 4, ..."""
    rows = []
    with tempfile.TemporaryDirectory() as out:
        cfg = replace(base_config(args, out), epochs=1, teacher=teacher)
        distill_together([replace(cfg, method="at", feat_weight=0.5)])  # warm-up: the teacher check, caches
        ce_seconds, _ = timed(lambda: distill(replace(cfg, method="ce", name="ce")))
        for k in args.sizes:
            members = [replace(cfg, method="at", feat_weight=float(i + 1)) for i in range(k)]
            seconds, results = timed(lambda members=members: distill_together(members))
            assert not any(isinstance(r, Exception) for r in results), results
            rows.append({"members": k, "seconds_per_member": seconds / k, "relative_to_ce": seconds / k / ce_seconds})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke profile on generated data (seconds)")
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of every run (cpu profile)")
    parser.add_argument("--subset", type=int, default=1000, help="training images per class (cpu profile)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--reading-epochs", type=int, default=4, help="epochs of the test-reading row's runs")
    parser.add_argument("--prune-epochs", type=int, default=8, help="epochs of the pruning row's runs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument(
        "--rows",
        nargs="+",
        default=list(ROWS),
        choices=list(ROWS),
        help="which rows to measure; the others are kept from the existing --out file",
    )
    parser.add_argument("--teacher", default="", help="a trained teacher (default: the cpu profile's, trained once)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sweep_speed.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as teacher_dir:
        teacher = args.teacher or train(_teacher(args, teacher_dir)).run_dir
        report = _existing(args.out) if set(args.rows) != set(ROWS) else {}
        report.update(profile="smoke" if args.quick else "cpu", epochs=1 if args.quick else args.epochs)
        for row in args.rows:
            report[row] = ROWS[row](args, teacher)
            # rows kept from an earlier run keep their own provenance
            for part in report[row] if isinstance(report[row], list) else [report[row]]:
                part.update(commit=code_commit(), processor=processor())
        report["timing_columns_ignored"] = TIMING_COLUMNS
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return report


ROWS = {
    "grid_fp32": lambda args, teacher: grid_row(args, teacher, "off"),
    "grid_bf16_teacher": lambda args, teacher: grid_row(args, teacher, "bf16"),
    "member_share": member_share,
    "test_read_at_end": test_reading_row,
    "pruning": pruning_row,
}


def _existing(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _teacher(args, tmp: str):
    """The smoke profile's teacher, or the demo's (the ``cpu`` profile's, trained once in ./runs and reused)."""
    return teacher_config(base_config(args, tmp) if args.quick else make_config("cpu", data_dir=args.data_dir))


if __name__ == "__main__":
    main(sys.argv[1:])
