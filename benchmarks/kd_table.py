"""Every registered distillation method on a `cpu` pair, at its released recipe: the untuned table.

    python benchmarks/kd_table.py              # resumable; reuses finished runs and the CSV's rows from this
                                               # processor; writes docs/methods_untuned.*
    python benchmarks/kd_table.py --quick      # smoke profile on generated data: checks the script (seconds)
    python benchmarks/kd_table.py --table-only # rebuild the table from the committed CSV (with --tune: the tuned)
    python benchmarks/kd_table.py --cost       # each method's seconds per step against CE (minutes)
    python benchmarks/kd_table.py --methods ce kd at   # some methods; their rows replace theirs in the CSV
    python benchmarks/kd_table.py --pair vgg13-mv2     # another pair of pairs.py (default: the demo's)
    python benchmarks/kd_table.py --pair vgg16-vgg11 --replace-pair  # its rows came from another processor
    python benchmarks/kd_table.py --compare-published  # each method's published CIFAR-100 number beside ours
                                                       # (with --tune: beside the tuned picks' test top-1)
    python benchmarks/kd_table.py --tune               # tuned on validation, picks at 5 seeds: docs/methods_tuned.*
                                                       # (grid runs kept in results/methods_tuned_grids.csv)

Each method runs with its published recipe, untuned, 3 seeds (model and stream seed together, so
every method is paired by seed with cross-entropy and KD), on a pair of ``pairs.py`` (default the
demo's: VGG13 x1/4 teacher, seed 0, and VGG8 x1/8 student; 10,000 images, 30 epochs). Values
counted in epochs of the release's 240-epoch schedule are scaled to this one (DKD's and ReviewKD's
warm-up 20 → 2.5, CTKD's curriculum 10 → 1.25), and CRD draws the release's share of negatives
(16,384 of 50,000 images → 3,277 of 10,000); FSP, AB and FT take their init stage as the same share
of the run as the release. The teacher of feature methods runs online, under bf16 autocast where the
processor runs bf16 natively and in fp32 elsewhere (`--teacher-amp auto`, as the notebooks; the two give
students within noise of each other, docs/performance.md); the logit methods read cached logits (as the
notebooks). Each row records the teacher's precision.

Every run lands in ``docs/methods_untuned.csv`` (pair, method, seed, teacher, validation and test top-1,
minutes had it run alone); the markdown table (validation top-1, paired differences to CE and to KD
with 95% CIs, failed runs) and its figure are rebuilt from that file (``methods_table.py``, which builds
every table of the benchmark). Only validation is compared: nothing here is picked, and the table is
labelled untuned.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from analysis import FAILED, minutes_alone  # noqa: E402
from config import make_config  # noqa: E402
from cost import fast_teacher_amp, measure_cost, processor  # noqa: E402
from experiment import teacher_config, teacher_seeds  # noqa: E402
from methods_table import (  # noqa: E402
    DEFAULT_PAIR,
    read_rows,
    tables,
    tuned_tables,
    with_pair,
    write,
    write_tuned,
    write_versus_published,
)
from pairs import get_pair, pair_config, pairs  # noqa: E402
from pruning import Prune  # noqa: E402
from registry import METHODS, loss_methods, wants_second_view  # noqa: E402
from run_records import code_commit  # noqa: E402
from runs import make_loaders, run_lock, train  # noqa: E402
from sweeps import RunsFailed, sweep  # noqa: E402
from tuning import confirm, tune  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
# the --tune grid's runs, per epoch: a pair's tuning outlasts a session, and the next may be on a fresh machine
TUNING_RECORD = os.path.join(ROOT, "results", "methods_tuned_grids.csv")
RELEASE_EPOCHS = 240  # the CIFAR-100 schedule the recipes' epoch counts belong to
RELEASE_TRAIN_IMAGES = 50_000
CRD_NEGATIVES = 16_384


def methods() -> list[str]:
    """Cross-entropy, then every registered distillation method but the ``+kd`` combinations and
    FitNets' stage 1 (a pre-training step, not a method one compares)."""
    return [
        "ce",
        *sorted(m for m in loss_methods() if "+kd" not in m and m != "fitnet_stage1" and METHODS[m].standalone),
    ]


def base_config(args):
    if args.quick:  # the pair's networks at the smoke profile's widths
        (tm, _), (sm, _) = get_pair("cpu", args.pair).teacher, get_pair("cpu", args.pair).student
        data = os.path.join(args.data_dir, "synthetic")  # generated there: ./data/synthetic, as the profile's
        quick = dict(epochs=3, threads=1, model=sm, teacher_model=tm)
        return make_config("smoke", data_dir=data, out_dir=args.out_dir, **quick)
    return pair_config("cpu", args.pair, data_dir=args.data_dir, out_dir=args.out_dir)


def scaled(cfg) -> dict:
    """The recipe values that count epochs or images of the release, scaled to ``cfg``'s run."""
    train_images = len(make_loaders(cfg).train.images)
    share = cfg.epochs / RELEASE_EPOCHS
    return {
        "warmup": 20 * share,
        "ctkd_loops": 10 * share,
        "crd_negatives": min(round(CRD_NEGATIVES * train_images / RELEASE_TRAIN_IMAGES), train_images - 1),
    }


def run(args, recorded: frozenset[tuple[str, str]] = frozenset()) -> pd.DataFrame:
    """Every method's seeds under each teacher seed, but the (method, teacher) pairs in ``recorded``: the CSV
    already holds them from this processor (``recorded_here``), so they are not trained again."""
    parts, trained_on = [], {}
    for teacher_seed in args.teacher_seeds:  # students nested in teachers: every method under each
        cfgs = configs(args, teacher_seed)
        trained_on |= views(cfgs)
        teacher = os.path.basename(next(iter(cfgs.values())).teacher)
        cfgs = {m: c for m, c in cfgs.items() if (m, teacher) not in recorded}
        cached = [m for m, c in cfgs.items() if c.teacher_cache]
        online = [m for m in cfgs if m not in cached]
        for group in (cached, online):
            if group:
                amp = "cached logits" if group is cached else cfgs[group[0]].teacher_amp
                parts.append(_sweep(cfgs[group[0]], group, args).assign(teacher=teacher, teacher_amp=amp))
    if not parts:
        return pd.DataFrame(columns=["pair", "method", "seed", "teacher"])
    df = pd.concat(parts, ignore_index=True)
    df.insert(0, "pair", args.pair)
    df["views"] = df["method"].map(trained_on)
    trained = [d for d in df["run_dir"] if os.path.isfile(os.path.join(d, "checkpoint.pt"))]
    df["minutes_alone"] = df["run_dir"].map(minutes_alone(trained))
    df["commit"] = code_commit()
    df["processor"] = processor()  # runs on two kinds of processor differ in their bits: do not pair them
    keep = [
        "pair",
        "method",
        "seed",
        "teacher",
        "teacher_amp",
        "val_top1",
        "test_top1",
        "minutes_alone",
        FAILED,
        "error",
        "views",
        "commit",
        "processor",
    ]
    return df[[c for c in keep if c in df]]


def views(cfgs: dict) -> dict[str, int]:
    """How many views of each image each method's runs train on (2: MLKD's release adds a RandAugment one)."""
    return {m: 2 if wants_second_view(c) else 1 for m, c in cfgs.items()}


def configs(args, teacher_seed: int = 0) -> dict:
    """Each method's run config as the table trains it: cached logits for logit methods, a bf16
    teacher online for the others, the recipe's epoch and image counts scaled to the run; the
    pair's teacher of ``teacher_seed`` (model and data-stream seed), trained first if need be."""
    cfg = base_config(args)
    # seed 0 is the pair's own teacher (2 threads, as the demo's); others are the notebooks' extra teacher
    # seeds (``experiment.teacher_seeds``: 1 thread), so both read back the same folders
    teacher = train(teacher_config(cfg)) if teacher_seed == 0 else teacher_seeds(cfg, [teacher_seed])[0]
    cfg = replace(cfg, teacher=teacher.run_dir, **scaled(cfg))
    out = {}
    for m in args.methods or methods():
        if m not in METHODS.names():
            raise SystemExit(f"unknown method {m!r}; registered: {', '.join(methods())}")
        logit = METHODS[m].needs_teacher and not METHODS[m].needs_features
        out[m] = replace(cfg, method=m, **({"teacher_cache": True} if logit else {"teacher_amp": args.teacher_amp}))
    return out


def step_costs(args) -> pd.DataFrame:
    """Seconds per training step of each method (``cost.measure_cost``: a fresh process, the median
    of 20 steps, at the main stage), relative to cross-entropy's measured in the same call."""
    rows = []
    for m, cfg in configs(args).items():
        try:
            rows.append({"method": m, **measure_cost(cfg)})
        except Exception as err:  # a method that cannot run on this pair (FSP's channels) is a row
            rows.append({"method": m, "error": f"{type(err).__name__}: {err}"})
    df = pd.DataFrame(rows)
    if "ce" in set(df["method"]):
        df["relative_to_ce"] = df["seconds_per_step"] / df.loc[df["method"] == "ce", "seconds_per_step"].iloc[0]
    df["commit"], df["processor"] = code_commit(), processor()
    return df


def _sweep(cfg, names: list[str], args) -> pd.DataFrame:
    try:
        return sweep(cfg, {"method": names}, seeds=range(args.seeds), jobs=args.jobs)
    except RunsFailed as err:  # a method that breaks is a row of the table, not the end of the benchmark
        return err.results


def merged(path: str, df: pd.DataFrame, keys: list[str], keep_other=None, read_back=()) -> pd.DataFrame:
    """``df``'s rows replace theirs (same ``keys``) in the CSV at ``path``, read now, under a lock, so that
    several benchmark processes (method groups run side by side) each add their rows and none is lost.
    ``keep_other`` filters the old rows kept (default: all but the replaced ones). A new row equal to its
    old one in the ``read_back`` columns is a finished run read back, not trained again: it keeps the
    old row's commit and processor, which say what trained it."""
    with run_lock(os.path.dirname(os.path.abspath(path))):
        if os.path.isfile(path):
            old = read_rows(path)
            df = _provenance_kept(old, df, keys, list(read_back)) if read_back else df
            old = old if keep_other is None else old[keep_other(old)]
            # nothing new (every row read back): the old rows as they were, their columns' types kept
            df = pd.concat([old, df], ignore_index=True).drop_duplicates(keys, keep="last") if len(df) else old
        df.to_csv(path, index=False)
    return df


def _provenance_kept(old: pd.DataFrame, new: pd.DataFrame, keys: list[str], same: list[str]) -> pd.DataFrame:
    kept = [c for c in ("commit", "processor") if c in old and c in new]
    if not kept or not set(keys + same) <= set(old) & set(new):
        return new
    was = new[keys + same].merge(old[keys + same + kept].drop_duplicates(keys, keep="last"), on=keys, how="left")
    # exact equality: a read-back run reproduces its metrics to the bit; nan == nan for a failed run's empty cells
    equal = was[kept[0]].notna().to_numpy().copy()
    for c in same:
        a, b = was[f"{c}_x"], was[f"{c}_y"]
        equal &= ((a == b) | (a.isna() & b.isna())).to_numpy()
    out = new.copy()
    for c in kept:
        out[c] = np.where(equal, was[c].to_numpy(), new[c].to_numpy())
    return out


def check_reproduces(args, done: pd.DataFrame) -> bool:
    """Methods added to a pair whose rows this processor trained before, on a machine that may not have their
    runs: the teacher is retrained here, and its students pair with the recorded ones only if it has the same
    bits. KD seed 0 (three minutes; instant where its run is present) is trained first and compared with its
    row to the bit; a difference stops the benchmark before the new methods train. True where it reproduced."""
    recorded = done[(done["pair"] == args.pair) & (done["method"] == "kd") & (done["seed"] == 0)]
    if recorded.empty or (args.methods or methods()) == ["kd"]:
        return False
    probe = argparse.Namespace(**(vars(args) | {"methods": ["kd"], "seeds": 1}))
    cfg = configs(probe)["kd"]
    row = recorded[recorded["teacher"] == os.path.basename(cfg.teacher)]
    if row.empty:
        return False
    here = _sweep(cfg, ["kd"], probe).iloc[0]
    old = row.iloc[-1]
    same = all(here[c] == old[c] or (pd.isna(here[c]) and pd.isna(old[c])) for c in ("val_top1", "test_top1"))
    now, then = float(here["val_top1"]), float(old["val_top1"])
    print(f"kd seed 0 of {args.pair}: validation {now!r} here, {then!r} in the CSV")
    if not same:
        raise SystemExit(
            f"kd seed 0 of pair {args.pair} does not reproduce its row of {args.prefix}.csv (trained at "
            f"{old.get('commit', '?')} on {old.get('processor', '?')}): this machine's teacher or code computes "
            "other bits, so new runs would not pair by seed with the recorded ones. Run every method of the pair "
            "here with --replace-pair."
        )
    return True


def recorded_here(done: pd.DataFrame, args) -> frozenset[tuple[str, str]]:
    """The (method, teacher) pairs of ``args.pair`` whose every seed the CSV holds from this processor, trained
    as the method trains now (as many views: rows from before the column trained on one): read back from it
    rather than trained again (a fresh machine has none of their runs)."""
    if "processor" not in done:
        return frozenset()
    rows = done[(done["pair"] == args.pair) & (done["processor"] == processor())]
    trained_as = rows["views"].fillna(1) if "views" in rows else pd.Series(1, index=rows.index)
    rows = rows[trained_as == rows["method"].map(views(configs(args))).fillna(1)]
    seeds = set(range(args.seeds))
    return frozenset(mt for mt, g in rows.groupby(["method", "teacher"]) if seeds <= set(g["seed"]))


def other_processors(df: pd.DataFrame, pair: str) -> list[str]:
    """The processors other than this one that trained rows of ``pair`` (a teacher retrained on another
    processor differs in its bits, so its students do not pair with theirs)."""
    if "processor" not in df:
        return []
    return sorted(set(df.loc[df["pair"] == pair, "processor"].dropna()) - {processor()})


# ----------------------------------------------------------------------------- --tune: picked on validation


def method_costs(pair: str, path: str) -> dict[str, float]:
    """Each method's minutes per run on ``pair`` over CE's, from the untuned table at ``path`` (the median
    of its runs): how ``cohorts`` shares a batch between workers. Empty where the table lacks the pair."""
    if not os.path.isfile(path):
        return {}
    df = read_rows(path)
    minutes = df[df["pair"] == pair].groupby("method")["minutes_alone"].median().dropna()
    if "ce" not in minutes or not minutes["ce"] > 0:
        return {}
    return (minutes / minutes["ce"]).round(2).to_dict()


def tuned_runs(args) -> pd.DataFrame:
    """Every method but CE tuned on validation (``tuning.tune``: its strength x 1/3, 1, 3 at 3 seeds, edges
    extended; the grid's runs read from and added to ``args.record``), then each pick, CE and KD's pick at
    5 seeds (``tuning.confirm``, trained here); one row per run."""
    bases = configs(args)
    tunable = {m: c for m, c in bases.items() if m != "ce"}
    prune = None if args.no_prune else Prune()
    cost = method_costs(args.pair, os.path.join(DOCS, "methods_untuned.csv"))
    tunings = tune(tunable, range(args.seeds), args.jobs, prune, args.record, method_cost=cost)
    grid = pd.DataFrame([r for t in tunings.values() for r in t.rows]).assign(stage="grid")
    confirmed = confirm(bases, tunings, range(args.confirm_seeds), args.jobs, method_cost=cost).assign(stage="confirm")
    df = pd.concat([grid, confirmed], ignore_index=True)
    picks = {t.method: t.pick for t in tunings.values()}
    edges = {t.method: t.edge() is not None for t in tunings.values()}
    df["picked"] = [v == picks.get(m) for m, v in zip(df["method"], df["value"], strict=True)]
    df["pick_on_edge"] = df["method"].map(edges)
    trained = [d for d in df["run_dir"].dropna() if os.path.isfile(os.path.join(d, "checkpoint.pt"))]
    # a run read from the record, its folder elsewhere: the minutes its own epochs measured
    alone = df["run_dir"].map(minutes_alone(trained))
    df["minutes_alone"] = alone.fillna(df["minutes_alone"]) if "minutes_alone" in df else alone
    df.insert(0, "pair", args.pair)
    df["teacher"] = os.path.basename(next(iter(bases.values())).teacher)
    df["views"] = df["method"].map(views(bases))
    df["commit"], df["processor"] = code_commit(), processor()
    keep = ["pair", "method", "param", "value", "seed", "stage", "picked", "pick_on_edge", "pruned_at", "teacher",
            "val_top1", "test_top1", "minutes_alone", FAILED, "error", "recorded", "views", "commit",
            "processor"]  # fmt: skip
    return df[[c for c in keep if c in df]]


def main(argv=None) -> pd.DataFrame:
    code_commit()  # the code this process runs, before anything can change the tree
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke profile on generated data")
    parser.add_argument("--table-only", action="store_true", help="rebuild the table from the CSV, train nothing")
    parser.add_argument(
        "--cost", action="store_true", help="only each method's seconds per step vs CE: <prefix>_cost.csv"
    )
    parser.add_argument(
        "--teacher-amp",
        choices=["auto", "bf16", "off"],
        default="auto",
        help="the online teacher's precision; auto: bf16 where the CPU runs it natively, else fp32 (docs/protocol.md)",
    )
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--out-dir", default="runs")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per run (with --tune: per grid cell)")
    parser.add_argument(
        "--teacher-seeds",
        type=int,
        nargs="+",
        default=[0],
        help="the pair's teachers (each trained once): every method's students under each, compared nested",
    )
    parser.add_argument("--tune", action="store_true", help="tune each method on validation, confirm at more seeds")
    parser.add_argument("--confirm-seeds", type=int, default=5, help="with --tune: seeds of each pick")
    parser.add_argument(
        "--no-prune",
        action="store_true",
        help="with --tune: train every grid cell in full (default: prune on validation)",
    )
    parser.add_argument(
        "--record",
        default=None,
        help="with --tune: the CSV that keeps the grid's runs per epoch, read back on a machine without their "
        f"folders (default: {os.path.relpath(TUNING_RECORD, ROOT)}; none with --quick; 'none': no record)",
    )
    parser.add_argument("--jobs", default="auto")
    parser.add_argument(
        "--compare-published", action="store_true", help="write <prefix>_vs_published.md from the CSV, train nothing"
    )
    parser.add_argument("--pair", default=DEFAULT_PAIR, choices=list(pairs("cpu")), help="teacher-student pair")
    parser.add_argument("--methods", nargs="+", default=None, help="a subset (default: every method)")
    parser.add_argument(
        "--replace-pair",
        action="store_true",
        help="drop the pair's rows from the CSV and run its methods here (rows trained on another processor)",
    )
    parser.add_argument("--prefix", default=os.path.join(DOCS, "methods_untuned"), help="CSV and markdown path")
    args = parser.parse_args(argv)
    args.jobs = args.jobs if args.jobs == "auto" else int(args.jobs)
    if args.teacher_amp == "auto":
        args.teacher_amp = fast_teacher_amp()
    if args.record is None:
        args.record = None if args.quick else TUNING_RECORD
    elif args.record == "none":
        args.record = None
    if args.tune:
        path = (
            args.prefix.replace("methods_untuned", "methods_tuned") if args.prefix.endswith("untuned") else args.prefix
        )
        if args.table_only or args.compare_published:
            if not os.path.isfile(f"{path}.csv"):
                raise SystemExit(f"no {path}.csv yet: run python benchmarks/kd_table.py --tune first")
            df = with_pair(read_rows(f"{path}.csv"))
            if args.compare_published:
                write_versus_published(tuned_tables(df), path, tuned=True, rows=df)
            else:
                write_tuned(df, path, args.quick)
            return df
        keys = ["pair", "method", "value", "seed", "stage"]
        # the methods tuned now replace all their rows on this pair (a new grid may drop a cell); the pair's
        # other methods keep theirs, so a pair can be tuned in groups (--methods), each group committed
        tuned = set(args.methods or methods())
        keep = lambda old: (old["pair"] != args.pair) | ~old["method"].isin(tuned)  # noqa: E731
        df = merged(f"{path}.csv", tuned_runs(args), keys, keep_other=keep)
        write_tuned(df, path, args.quick)
        return df
    if args.cost:
        costs = step_costs(args)
        costs.insert(0, "pair", args.pair)
        costs.insert(2, "teacher_amp", args.teacher_amp)
        # other rows kept: other pairs, methods, teacher precisions and processors
        costs = merged(f"{args.prefix}_cost.csv", costs, ["pair", "method", "teacher_amp", "processor"])
        print(costs.round(3).to_string(index=False))
        return costs
    done = read_rows(f"{args.prefix}.csv") if os.path.isfile(f"{args.prefix}.csv") else None
    if args.compare_published or args.table_only:
        if done is None:
            raise SystemExit(f"no {args.prefix}.csv yet: run python benchmarks/kd_table.py first")
    if args.compare_published:
        write_versus_published(tables(with_pair(done)), args.prefix, rows=with_pair(done))
        return done
    if args.table_only:
        df = done
    else:  # the runs of this call replace their earlier rows; the other methods' and pairs' rows are kept
        keep = None
        if args.replace_pair:
            keep = lambda old: old["pair"] != args.pair  # noqa: E731
        elif done is not None and (elsewhere := other_processors(done, args.pair)):
            raise SystemExit(
                f"the {args.prefix}.csv rows of pair {args.pair} were trained on {', '.join(elsewhere)}, under a "
                f"teacher trained there; this machine ({processor()}) would train its own, with other bits, and "
                "runs under two teachers cannot be paired by seed. Run every method of the pair here with "
                "--replace-pair (its old rows are dropped), or add methods on the machine that trained them."
            )
        recorded = frozenset()
        if not args.replace_pair and done is not None and check_reproduces(args, done):
            recorded = recorded_here(done, args)
            if recorded:
                print(f"read from {args.prefix}.csv, not trained again: {', '.join(sorted(m for m, _ in recorded))}")
        keys, results = ["pair", "method", "seed", "teacher"], ["val_top1", "test_top1"]
        df = merged(f"{args.prefix}.csv", run(args, recorded), keys, keep_other=keep, read_back=results)
    write(df, args.prefix, args.quick)
    return df


if __name__ == "__main__":
    main(sys.argv[1:])
