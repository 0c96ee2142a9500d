"""MLKD with and without its release's second view, at the recipe, paired by seed with cross-entropy.

    python benchmarks/mlkd_views.py                      # vgg13-vgg8, 5 seeds: docs/mlkd_views.{csv,md}
    python benchmarks/mlkd_views.py --pair vgg16-vgg11   # another pair of pairs.py; its rows join the CSV
    python benchmarks/mlkd_views.py --table-only         # rebuild the markdown from the CSV
    python benchmarks/mlkd_views.py --quick              # smoke profile on generated data (seconds)

The MLKD release trains on two views of each image: crop and flip, and crop and flip followed by
RandAugment and Cutout (``randaugment.py``); CE and instance terms are taken on the second too
(``methods/mlkd.py``). The tables of ``kd_table.py`` first ran the first view's part only; this asks
what the second view changes, on the table's configs (``kd_table.configs``: cached teacher logits
for the first view, the teacher online for the second), each variant at the recipe (T 4, CE 0.1,
KD 0.9), nothing tuned or picked: both validation and last-epoch test top-1 are reported.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # kd_table, beside this file

import kd_table  # noqa: E402

from analysis import compare_columns, minutes_alone, summarize  # noqa: E402
from atomic_files import atomic_write_text  # noqa: E402
from cost import fast_teacher_amp, processor  # noqa: E402
from methods_table import DEFAULT_PAIR, read_rows  # noqa: E402
from methods_table import markdown as md_table
from pairs import pairs  # noqa: E402
from run_records import code_commit  # noqa: E402
from sweeps import run_all  # noqa: E402

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
# the compared conditions: the label, the method and its one setting
VARIANTS = {
    "ce": ("ce", {}),
    "mlkd, first view only": ("mlkd", {"mlkd_strong_view": False}),
    "mlkd, both views (release)": ("mlkd", {"mlkd_strong_view": True}),
}
COLUMNS = ["val_top1", "test_top1"]


def runs(args) -> pd.DataFrame:
    """Every variant at ``args.seeds`` seeds, trained (or read back) in one batch; one row per run."""
    bases = kd_table.configs(argparse.Namespace(**(vars(args) | {"methods": ["ce", "mlkd"]})))
    cells = [(label, s) for label in VARIANTS for s in range(args.seeds)]
    cfgs = [replace(bases[VARIANTS[v][0]], seed=s, data_seed=s, **VARIANTS[v][1]) for v, s in cells]
    results = run_all(cfgs, args.jobs, desc="mlkd views")
    rows = []
    for (variant, seed), r in zip(cells, results, strict=True):
        last = summarize(r.history)
        rows.append({"pair": args.pair, "variant": variant, "seed": seed, "run_dir": r.run_dir} | {
            "val_top1": last["last_val_top1"], "test_top1": last["last_top1"]
        })  # fmt: skip
    df = pd.DataFrame(rows)
    df["minutes_alone"] = df["run_dir"].map(minutes_alone(list(df["run_dir"])))
    df["teacher"] = os.path.basename(cfgs[0].teacher)
    df["commit"], df["processor"] = code_commit(), processor()
    return df.drop(columns="run_dir")


def command(pair: str, seeds: int, quick: bool) -> str:
    """The call that trains (or reads back) a pair's rows."""
    flags = [f"--pair {pair}"] if pair != DEFAULT_PAIR else []
    flags += (["--quick"] if quick else []) + ([f"--seeds {seeds}"] if seeds != 5 else [])
    return " ".join(["python benchmarks/mlkd_views.py", *flags])


def markdown(df: pd.DataFrame, quick: bool = False) -> str:
    """Per pair: each variant's mean, then the paired differences (95% CI) to CE and between the two MLKDs."""
    parts = [
        "# MLKD with and without its release's second view",
        "",
        "Each variant at the recipe (T 4, CE 0.1, KD 0.9), nothing tuned, on the table's configs "
        "(`kd_table.configs`). Differences are paired by seed (model and stream seed together) with 95% CIs; "
        "a CI that includes 0 is within noise. Last epoch, validation and test top-1; `minutes_alone`: one run, "
        "had it run alone.",
    ]
    for pair, g in df.groupby("pair", sort=False):
        means = g.groupby("variant", sort=False)[COLUMNS + ["minutes_alone"]].mean().round(2)
        weak = "mlkd, first view only"
        diffs = {
            "− CE": compare_columns(g, "variant", "ce", COLUMNS),
            f"− {weak}": compare_columns(g[g["variant"] != "ce"], "variant", weak, COLUMNS),
        }
        parts += [
            "",
            f"## {pair}, teacher `{g['teacher'].iloc[0]}`, {g['seed'].nunique()} seeds",
            "",
            f"`{command(pair, g['seed'].nunique(), quick)}`",
            "",
            md_table(means),
            "",
            md_table(pd.concat([_readable(d, name) for name, d in diffs.items()])),
            "",
            f"Rows written at {', '.join(sorted(set(g['commit'])))} on {', '.join(sorted(set(g['processor'])))} "
            "(a run already in its folder is read back, not trained again).",
        ]
    return "\n".join(parts) + "\n"


def _readable(d: pd.DataFrame, against: str) -> pd.DataFrame:
    """``compare_columns``'s rows as the table shows them: the comparison, the measure, the difference
    and its CI to two decimals."""
    return pd.DataFrame(
        {
            "comparison": [f"{variant} {against}" for variant, _ in d.index],
            "measure": [measure for _, measure in d.index],
            "n": d["n"].to_numpy(),
            "difference": d["diff"].round(2).to_numpy(),
            "95% CI": [f"{lo:+.2f} to {hi:+.2f}" for lo, hi in zip(d["ci_low"], d["ci_high"], strict=True)],
            "p": [f"{p:.3g}" for p in d["p"]],
            "verdict": d["verdict"].to_numpy(),
        }
    ).set_index("comparison")


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pair", default=DEFAULT_PAIR, choices=list(pairs("cpu")))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--jobs", default="auto")
    parser.add_argument("--quick", action="store_true", help="smoke profile on generated data")
    parser.add_argument("--table-only", action="store_true", help="rebuild the markdown from the CSV")
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--out-dir", default="runs")
    parser.add_argument("--teacher-amp", default="auto")
    parser.add_argument("--prefix", default=os.path.join(DOCS, "mlkd_views"))
    args = parser.parse_args(argv)
    args.jobs = args.jobs if args.jobs == "auto" else int(args.jobs)
    args.teacher_amp = fast_teacher_amp() if args.teacher_amp == "auto" else args.teacher_amp
    path = f"{args.prefix}.csv"
    if args.table_only:
        df = read_rows(path)
    else:
        df = kd_table.merged(path, runs(args), ["pair", "variant", "seed"])
    atomic_write_text(f"{args.prefix}.md", markdown(df, args.quick))
    print(markdown(df, args.quick))
    return df


if __name__ == "__main__":
    main(sys.argv[1:])
