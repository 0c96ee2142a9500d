"""What measured method costs change in the plan of a tuning batch: its predicted length, both ways.

    python benchmarks/cohort_plan.py                                   # the groups docs/performance.md quotes
    python benchmarks/cohort_plan.py --pair vgg13-vgg8 --methods ab cc # one batch of your own

For a ``kd_table.py --tune`` grid batch (each method's strength x 1/3, 1, 3 at 3 seeds, nothing trained
yet), ``cohorts.plan_cohorts`` on 2 workers, once weighing runs by their student's FLOPs alone and once
with each method's measured cost (``kd_table.method_costs``: the untuned table's minutes per run over
CE's), and each plan's length by ``cohorts.makespan`` under the measured costs, in units of the batch's
median run, beside the lower bound (half the work, no shared teacher forward). A prediction of the plan's
model, not a timing: no student trains (the pair's teacher does first where runs/ lacks it, as for
the benchmark).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kd_table  # noqa: E402

from cohorts import makespan, plan_cohorts, teacher_key, work_left  # noqa: E402
from pairs import pairs  # noqa: E402
from tuning import FACTORS, Tuning, cell_config, recipe_value, strength  # noqa: E402

GROUPS = [
    ("vgg13-vgg8", ["ab", "cc", "nst", "ofd", "ft", "vid", "kdsvd", "reviewkd"]),
    ("vgg13-mv2", ["fitnet", "at", "sp", "pkt", "rkd", "crd"]),
    ("vgg13-mv2", ["ab", "cc", "nst", "ofd", "ft", "vid", "kdsvd", "reviewkd"]),
]


def grid_batch(pair: str, methods: list[str], seeds: int = 3) -> list:
    """The first batch of ``--tune`` for ``methods`` on ``pair``, as configs in a folder nothing trained in."""
    args = argparse.Namespace(quick=False, pair=pair, data_dir="data", out_dir="runs", methods=methods)
    args.teacher_amp, args.seeds = "bf16", seeds
    cfgs = []
    for base in kd_table.configs(args).values():
        key = strength(base)
        value = recipe_value(base, key)
        t = Tuning(base.method, key, value, [value * f for f in FACTORS])
        cfgs += [cell_config(base, t, v, s) for v in t.values for s in range(seeds)]
    return [replace(c, out_dir=os.path.join("runs", "cohort_plan_untrained")) for c in cfgs]


def compare(pair: str, methods: list[str], workers: int = 2) -> dict:
    cfgs = grid_batch(pair, methods)
    measured = kd_table.method_costs(pair, os.path.join(kd_table.DOCS, "methods_untuned.csv"))
    cost = work_left(cfgs, measured)
    keys = [teacher_key(c) for c in cfgs]
    online = {i for i, k in enumerate(keys) if k is not None and not k[2]}
    flops, weighed = plan_cohorts(cfgs, workers), plan_cohorts(cfgs, workers, measured)
    blind, seen = makespan(flops, online, workers, cost), makespan(weighed, online, workers, cost)
    return {"pair": pair, "runs": len(cfgs), "FLOP plan": blind, "measured plan": seen,
            "lower bound": sum(cost) / workers, "change": seen / blind - 1}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=list(pairs("cpu")), help="with --methods: one batch of your own")
    parser.add_argument("--methods", nargs="+", help="with --pair")
    args = parser.parse_args(argv)
    if bool(args.pair) != bool(args.methods):
        parser.error("--pair and --methods go together")
    for pair, methods in [(args.pair, args.methods)] if args.pair else GROUPS:
        r = compare(pair, methods)
        print(
            f"{r['pair']} {' '.join(methods)}: {r['runs']} runs, FLOP plan {r['FLOP plan']:.1f}, measured plan "
            f"{r['measured plan']:.1f} ({r['change']:+.0%}), lower bound {r['lower bound']:.1f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
