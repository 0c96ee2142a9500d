"""The study this project re-implements, as the `original` profile and one command.

    python original_study.py --seeds 0 1 2     # CIFAR-100 (downloaded) and the hub teacher (downloaded)
    configs = arm_configs(seed=0)               # the four arms' configs, to run or change one by one
    python train_kd.py --profile original --method kd   # one arm from the usual command line

Its configuration: CIFAR-100; the teacher is pytorch-cifar-models' VGG16-BN (``hub:cifar100_vgg16_bn``,
torchvision layout: a 512-512-100 MLP head); every student is a VGG11-BN in the same layout
(``vgg11_tv``, width 1); Adam at a constant 1e-4 for 20 epochs; KD with α = 0.6 and T = 3, i.e.
L = (1 − α)·CE + α·T²·KL (``ce_weight`` 0.4, ``kd_weight`` 0.6, set by the profile). Its four arms:

| arm | method here | published (one run each) |
|---|---|---|
| student alone | ``ce`` | 46.2% |
| KD | ``kd`` | 48.0-48.7% |
| hint + KD | ``fitnet+kd`` (FitNets' hint at its registered stage, plus KD) | 56.8% |
| specialists | ``partition`` then ``specialists`` (below) | 43.5% |

The specialists: 4 students regress a quarter each of the teacher's 512-d embedding (no cross-entropy),
reading through the teacher's own MLP head, frozen; then that head, copied, learns on their outputs.

What the study did not state is this project's default, and said so here: batch 128, crop and flip,
no weight decay, the specialists' head trained for ``HEAD_EPOCHS``. Unlike the study, 5,000 training
images (50 per class) are held out for validation, so every run reports validation and test; the hub
teacher was trained on all 50,000, those included (the teacher has seen the validation images; the
students have not). Test top-1 is read at the last epoch: nothing is picked.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import pandas as pd

from analysis import ci95, compare_columns
from config import Config, make_config
from sweeps import run_all

PROFILE = "original"
HEAD_EPOCHS = 10
ARMS: dict[str, dict] = {
    "student alone": {"method": "ce"},
    "KD": {"method": "kd"},
    "hint + KD": {"method": "fitnet+kd"},
    "specialists": {"method": "partition", "members": 4, "ce_weight": 0.0},  # pure regression, as the study
}
PUBLISHED = {"student alone": "46.2", "KD": "48.0-48.7", "hint + KD": "56.8", "specialists": "43.5"}


def arm_configs(seed: int = 0, **overrides) -> dict[str, Config]:
    """Each arm's config at ``seed`` (model and data stream together); ``overrides`` as in ``make_config``."""
    base = make_config(PROFILE, seed=seed, data_seed=seed, **overrides)
    return {arm: replace(base, **fields) for arm, fields in ARMS.items()}


def run_study(seeds=(0, 1, 2), jobs: int | str = "auto", **overrides) -> pd.DataFrame:
    """Every arm at every seed; one row per (arm, seed) with validation and test top-1 at the last epoch."""
    from multi_student import head_config

    configs = [arm_configs(s, **overrides) for s in seeds]
    rows = []
    single = [c for cfgs in configs for arm, c in cfgs.items() if arm != "specialists"]
    stage1 = [cfgs["specialists"] for cfgs in configs]
    results = run_all(single + stage1, jobs=jobs, desc="original study")
    done1 = results[len(single) :]
    heads = run_all([head_config(c, r.run_dir, HEAD_EPOCHS) for c, r in zip(stage1, done1, strict=True)], jobs)
    arms = [arm for _ in seeds for arm in ARMS if arm != "specialists"] + ["specialists"] * len(seeds)
    for arm, result in zip(arms, results[: len(single)] + heads, strict=True):
        last = result.history.iloc[-1]
        rows.append(
            {"arm": arm, "seed": result.config.seed, "val_top1": last["val_top1"], "test_top1": last["test_top1"]}
        )
    return pd.DataFrame(rows)


def study_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per arm: test top-1 mean and 95% CI over seeds, the paired difference to the student alone,
    validation top-1, and the published number beside them."""
    out = df.groupby("arm", sort=False).agg(
        seeds=("seed", "count"), test_top1=("test_top1", "mean"), val_top1=("val_top1", "mean")
    )
    out["test_ci95"] = df.groupby("arm", sort=False)["test_top1"].apply(ci95)
    diffs = compare_columns(df, by="arm", baseline="student alone", columns=["test_top1"]).xs("test_top1", level=1)
    out["vs alone"] = diffs["diff"]
    out["vs alone 95% CI"] = diffs["ci_low"].map("{:+.2f}".format) + " to " + diffs["ci_high"].map("{:+.2f}".format)
    out["published"] = [PUBLISHED[a] for a in out.index]
    return out


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--out-dir", default="runs")
    parser.add_argument("--jobs", default="auto")
    parser.add_argument("--csv", default="", help="also write the per-run rows here")
    args = parser.parse_args(argv)
    jobs = args.jobs if args.jobs == "auto" else int(args.jobs)
    df = run_study(args.seeds, jobs, data_dir=args.data_dir, out_dir=args.out_dir)
    if args.csv:
        df.to_csv(args.csv, index=False)
    table = study_table(df)
    print(table.round(2).to_string())
    return table


if __name__ == "__main__":
    main()
