"""Results as data: per-run summaries, tables over seeds, paired comparisons, seed plots, and
the diagnostics computed from saved outputs (logits, features).

Everything here reads run histories (``metrics.csv`` as a DataFrame), tensors of outputs or plain
numbers; nothing imports the training code, so results can be analysed without the loop.

    summarize(history)               last epoch, and the epoch picked on validation, of one run
    mean_std_table({"kd": runs})     one row per group: n, mean ± 95% CI half-width, std
    compare(kd_runs, ce_runs)        paired by seed: mean difference, 95% CI, p (paired t-test);
                                     .verdict(bound): higher / lower / equivalent (TOST) / within noise
    paired_table({"kd − ce": (kd, ce)}) a section's comparisons, one row each (compare_table: all vs one)
    compare_nested({t: kd}, {t: ce}) students nested in teachers: per teacher, and pooled over them
    nested_table({"kd − ce": (...)}) several nested comparisons, one block of rows each
    cell_table(sweep_df, ["T"])      a sweep's cells: mean and 95% CI per cell, the pick flagged
    minutes_alone(run_dirs)          each run's training minutes had it run alone (the cost of a notebook)
    time_report(run_dirs, START)     a notebook's time, stated one way: minutes alone, from scratch, this run
    output_stats, reliability_bins, logit_relation, logit_conflicts, top1_agreement, per_sample_kl,
    spearman_rows, expected_calibration_error, conflict_analysis, linear_cka, pairwise_disagreement,
    group_metrics, r_squared         from logits / features

Every choice (an epoch, a cell of a sweep) is made on the validation columns (``val_*``); test
accuracy is read at the chosen point only. Runs without a validation split (``val_size=0``,
the ``paper`` profile) fall back to the last epoch, and their "best" epoch is picked on test,
as the published CIFAR-100 tables do; ``summarize`` says which in ``picked_by``.

A failed run (one the loop marked: still at chance, see ``train_eval.chance_failure``, or
diverged; its history's ``failed`` column holds why) is never averaged in: ``summarize`` says
``failed``, ``summarize_seeds``, ``mean_std_table`` and ``cell_table`` leave it out and show how
many runs failed and their seeds, ``compare`` leaves out the seeds where either side failed and
names them (``Paired.failed``), and a sweep picks only among cells none of whose runs failed.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats

# The metrics column that marks a failed run (``run_folders.FAILED_COLUMN``): its reason on every row.
FAILED = "failed"


def run_failure(history: pd.DataFrame) -> str | None:
    """Why the run whose per-epoch metrics these are failed (its ``failed`` column), or None."""
    if FAILED not in history:
        return None
    reasons = [v for v in history[FAILED] if isinstance(v, str) and v]
    return reasons[-1] if reasons else None


def summarize(history: pd.DataFrame) -> dict:
    """One run: last-epoch accuracies, and test accuracy at the epoch of best validation top-1.

    ``best_top1``/``best_top5`` are test accuracies at ``best_epoch``, the epoch that
    ``picked_by`` (``val_top1`` when the run has a validation split) ranks highest. A failed
    run's summary adds ``failed``: why.
    """
    picked_by = "val_top1" if "val_top1" in history else "test_top1"
    best = history.loc[history[picked_by].idxmax()]
    last = history.iloc[-1]
    return {  # a run paused before its last epoch (``stop_after``) has read no test yet: nan
        "last_top1": last.get("test_top1", math.nan),
        "last_top5": last.get("test_top5", math.nan),
        "last_val_top1": last.get("val_top1", math.nan),
        "best_top1": best.get("test_top1", math.nan),
        "best_top5": best.get("test_top5", math.nan),
        "best_epoch": int(best["epoch"]),
        "picked_by": picked_by,
        "train_seconds": history["seconds"].sum(),
    } | ({FAILED: run_failure(history)} if run_failure(history) else {})


ACCURACY_COLUMNS = ("last_top1", "last_top5", "best_top1", "best_top5")


# Config fields that say which run it is, not how much work it does.
RUN_IDENTITY = ("seed", "data_seed", "init_from", "out_dir", "data_dir")


def history_minutes(metrics: pd.DataFrame) -> float:
    """One run's minutes had it been alone, from its metrics alone: CPU time per thread where the
    epochs have it, else their wall ``seconds`` (``minutes_alone`` without its pooled estimate)."""
    per_thread = metrics["seconds"] * math.nan
    if {"cpu_seconds", "threads"} <= set(metrics):
        per_thread = (metrics["cpu_seconds"] / metrics["threads"]).where(metrics["threads"] > 0)
    return float(per_thread.fillna(metrics["seconds"]).sum() / 60)


def minutes_alone(run_dirs: Iterable[str]) -> pd.Series:
    """Each run's training minutes had it had its cores to itself, indexed by run folder.

    A CPU epoch counts its CPU time per thread (``cpu_seconds / threads``), which, unlike its wall
    time ``seconds``, barely grows while another job shares the cores (a second notebook's
    execution, a test run): about +12% with three 1-thread jobs on one core, against 3.4x wall.
    An epoch without it (older runs, GPU runs) counts the median, over the given runs whose config
    differs from its run's only in ``RUN_IDENTITY``, of each run's median epoch estimate (its CPU
    time per thread where it has one, else its ``seconds``): runs that differ only in seeds do the
    same work, so that median ignores the runs that shared the cores for most of their epochs, as
    long as most runs did not or have CPU times. Config and metrics are read from each run's
    checkpoint (``run_folders.run_record``): a truncated ``metrics.csv`` or an edited
    ``config.json`` beside it is not believed; a folder without one is read from those files,
    and refused, naming the file, where they are truncated or garbled. A failed run counts: it took its time.
    """
    from run_folders import run_record  # reads the checkpoint, never a stale or edited view of it

    runs, pooled = {}, {}
    for d in dict.fromkeys(run_dirs):  # each folder once, in order
        cfg, m = run_record(d)
        key = json.dumps({k: v for k, v in cfg.items() if k not in RUN_IDENTITY}, sort_keys=True)
        per_thread = (
            m["cpu_seconds"] / m["threads"] if {"cpu_seconds", "threads"} <= set(m) else m["seconds"] * math.nan
        ).where(m.get("threads", 0) > 0)  # threads 0: a GPU run, whose CPU time says nothing of its speed
        runs[d] = (key, per_thread)
        pooled.setdefault(key, []).append(per_thread.fillna(m["seconds"]).median())
    median = {key: float(np.median(s)) for key, s in pooled.items()}
    return pd.Series(
        {d: per_thread.fillna(median[key]).sum() / 60 for d, (key, per_thread) in runs.items()}, dtype=float
    )


def time_report(
    run_dirs: Iterable[str], started: float | None = None, cores: int = 2, recorded: Iterable[float] = ()
) -> str:
    """The one statement of a notebook's time, for all four: its runs' minutes had each had its
    cores alone (``minutes_alone``: recorded CPU time per thread; a cohort's members share its
    teacher's time), that total over ``cores`` runs at a time as the from-scratch wall time, and,
    with ``started`` (a ``time.time()``), this execution's measured wall time. ``recorded``: the
    ``minutes_alone`` of runs read from a record (``run_records.py``; a sweep table's column), which
    count as the others do. Indexed by run folder (``table.set_index("run_dir")["minutes_alone"]``),
    a recorded run whose folder is among ``run_dirs`` counts once, from its folder: a grid cell's run
    that a later table reuses, or a pruned one resumed to the end, holds every epoch trained."""
    alone = minutes_alone(run_dirs)
    names = {os.path.basename(os.path.normpath(d)) for d in alone.index}
    if isinstance(recorded, pd.Series) and pd.api.types.is_string_dtype(recorded.index):
        recorded = recorded[~recorded.index.map(lambda d: os.path.basename(os.path.normpath(d))).isin(names)]
    extra = [float(m) for m in recorded]
    total, n = alone.sum() + sum(extra), len(alone) + len(extra)
    text = (
        f"{n} runs: {total:.1f} min had each run been alone (recorded CPU time per thread); "
        f"from scratch about {total / cores:.1f} min of wall time at {cores} runs at a time"
    )
    if extra:
        text += f" ({len(extra)} of the runs read from a record, trained in an earlier session)"
    if started is not None:
        text += f"; this execution: {(time.time() - started) / 60:.1f} min (finished runs are read back, not retrained)"
    return text


def ci95(values: Sequence[float]) -> float:
    """Half-width of the 95% confidence interval of the mean (Student's t, n - 1 dof); nan for n < 2."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return math.nan
    return float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def _seed(run, i: int):
    config = getattr(run, "config", None)
    return getattr(config, "seed", i)


def failed_runs(results: Sequence) -> dict:
    """``{seed: reason}`` of the failed runs among ``results`` (runs with ``.history``, ``.config``)."""
    return {_seed(r, i): run_failure(r.history) for i, r in enumerate(results) if run_failure(r.history)}


def _failures(failed: dict, total: int) -> str:
    """``"1 of 3 (seed 2)"``: how many runs of a group failed, and which ("0 of 3": none)."""
    if not failed:
        return f"0 of {total}"
    seeds = ", ".join(str(s) for s in failed)
    return f"{len(failed)} of {total} (seed{'s' if len(failed) > 1 else ''} {seeds})"


def summarize_seeds(results: Sequence) -> dict:
    """Mean, sample std and 95% CI half-width over seeds of each accuracy in ``summarize``, and mean minutes.

    Failed runs are left out: ``seeds`` counts the runs averaged, and where any failed, ``failed``
    (how many) and ``failed_seeds`` say which were left out (all accuracies nan if every run failed).
    """
    failed = failed_runs(results)
    trained = [r for r in results if run_failure(r.history) is None]
    table = pd.DataFrame([summarize(r.history) for r in trained], columns=[*ACCURACY_COLUMNS, "train_seconds"])
    out: dict = {"seeds": len(trained)}
    for col in ACCURACY_COLUMNS:
        out[col] = table[col].mean()
        out[f"{col}_std"] = table[col].std(ddof=1) if len(trained) > 1 else math.nan
        out[f"{col}_ci95"] = ci95(table[col])
    out["minutes"] = table["train_seconds"].mean() / 60
    if failed:
        out["failed"], out["failed_seeds"] = len(failed), list(failed)
    return out


def mean_std_table(groups: Mapping[str, Sequence], columns=ACCURACY_COLUMNS) -> pd.DataFrame:
    """One row per group of runs: ``n`` and each accuracy as "mean ± 95% CI half-width (std s)".

    Failed runs (still at chance, or diverged) are left out of ``n`` and the means; column ``failed``
    says how many of each group failed, and their seeds ("1 of 3 (seed 2)", or "0 of 3"): a method
    that fails on some seeds shows as unstable, not silently averaged. A group whose every run
    failed shows "–".
    """
    rows = {}
    for name, results in groups.items():
        s = summarize_seeds(results)
        rows[name] = {"n": s["seeds"]}
        for c in columns:
            ci = f"{s[c + '_ci95']:.2f}" if s["seeds"] > 1 else "–"
            std = f"{s[c + '_std']:.2f}" if s["seeds"] > 1 else "–"
            rows[name][c] = f"{s[c]:.2f} ± {ci} (std {std})" if s["seeds"] else "–"
        rows[name][FAILED] = _failures(failed_runs(results), len(results))
    return pd.DataFrame.from_dict(rows, orient="index")


@dataclass(frozen=True)
class Paired:
    """A paired comparison of two conditions over the same seeds: ``a - b``."""

    n: int
    mean_a: float
    mean_b: float
    diff: float  # mean of the per-seed differences a - b
    ci_low: float  # 95% CI of the mean difference (Student's t, n - 1 dof)
    ci_high: float
    p: float  # two-sided paired t-test
    seeds: tuple
    failed: tuple = ()  # seeds left out because a run of either side failed

    @property
    def within_noise(self) -> bool:
        """True when the 95% CI includes zero (or cannot be computed)."""
        return not (self.ci_low > 0 or self.ci_high < 0)

    def ci(self, level: float = 0.95) -> tuple[float, float]:
        """The mean difference's CI at ``level``, from the same t distribution as the 95% one."""
        if self.n < 2:
            return math.nan, math.nan
        q = stats.t.ppf(0.5 + level / 2, self.n - 1)
        half = (self.ci_high - self.ci_low) / 2 * q / stats.t.ppf(0.975, self.n - 1)
        return self.diff - half, self.diff + half

    def equivalent(self, bound: float) -> bool:
        """Two one-sided t-tests at 5% (TOST; Schuirmann 1987): the difference lies within ±``bound``,
        i.e. the 90% CI lies inside (-bound, bound). The bound must be stated before the runs."""
        lo, hi = self.ci(0.90)
        return -bound < lo and hi < bound

    def verdict(self, bound: float | None = None, words: tuple[str, str] = ("higher", "lower")) -> str:
        """``words[0]``/``words[1]`` when the 95% CI excludes 0; else "equivalent (±bound)" when TOST
        shows it, else "within noise" (no difference detected, none ruled out)."""
        if not self.within_noise:
            return words[0] if self.diff > 0 else words[1]
        if bound is not None and self.equivalent(bound):
            return f"equivalent (±{bound:g})"
        return "within noise"

    def __str__(self) -> str:
        ci = f"95% CI {self.ci_low:+.2f} to {self.ci_high:+.2f}, p = {self.p:.3g}, n = {self.n}"
        if self.failed:
            seeds = ", ".join(map(str, self.failed))
            ci += f"; seed{'s' if len(self.failed) > 1 else ''} {seeds} left out: failed runs"
        if self.within_noise:
            return f"{self.diff:+.2f} points: within noise ({ci})"
        return f"{self.diff:+.2f} points ({ci})"


def _by_seed(runs, metric: str) -> tuple[dict, set]:
    """``({seed: value}, {seeds of failed runs})`` from runs (``.config.seed`` and ``.history``), a
    mapping, or plain numbers."""
    if isinstance(runs, Mapping):
        return {k: float(v) for k, v in runs.items()}, set()
    runs = list(runs)
    if runs and hasattr(runs[0], "history"):
        values = {}
        for r in runs:
            if r.config.seed in values:
                raise ValueError(f"two runs with seed {r.config.seed}: a paired comparison needs one per seed")
            values[r.config.seed] = float(summarize(r.history)[metric])
        return values, set(failed_runs(runs))
    return {i: float(v) for i, v in enumerate(runs)}, set()  # plain numbers: paired by position


def compare(a, b, metric: str = "last_top1") -> Paired:
    """Paired comparison of condition ``a`` against ``b`` over the seeds both have.

    ``a``/``b``: lists of runs (matched by ``config.seed``; ``metric`` is a ``summarize`` key),
    ``{seed: value}`` mappings, or equal-length lists of numbers (matched by position).
    Returns the mean difference ``a - b``, its 95% confidence interval (t with n - 1 dof) and
    the paired t-test's p-value; a difference whose CI includes zero is within noise. A seed
    whose run failed on either side is left out, and named in ``failed`` (and when printed).
    """
    (va, fa), (vb, fb) = _by_seed(a, metric), _by_seed(b, metric)
    common = set(va) & set(vb)
    failed = tuple(sorted(common & (fa | fb)))
    seeds = tuple(sorted(common - set(failed)))
    if not seeds:
        left = f" (seeds {', '.join(map(str, failed))} left out: their runs failed)" if failed else ""
        raise ValueError(f"no seed in common: a has {sorted(va)}, b has {sorted(vb)}{left}")
    xa, xb = np.array([va[s] for s in seeds]), np.array([vb[s] for s in seeds])
    d = xa - xb
    if len(seeds) < 2:
        lo = hi = p = math.nan
    elif np.all(d == d[0]):  # no spread: the t statistic is undefined, the difference exact
        lo = hi = float(d[0])
        p = 1.0 if d[0] == 0 else 0.0
    else:
        test = stats.ttest_rel(xa, xb)
        lo, hi = test.confidence_interval(0.95)
        p = float(test.pvalue)
    return Paired(
        len(seeds), float(xa.mean()), float(xb.mean()), float(d.mean()), float(lo), float(hi), p, seeds, failed
    )


def failed_rows(df: pd.DataFrame) -> pd.Series:
    """Which rows of a table of runs (a sweep's) are failed runs: a reason in column ``failed``."""
    if FAILED not in df:
        return pd.Series(False, index=df.index)
    return df[FAILED].map(lambda v: isinstance(v, str) and bool(v))


def cell_table(df: pd.DataFrame, keys: Sequence[str] | None = None, columns=("val_top1", "test_top1")) -> pd.DataFrame:
    """A sweep's cells (one row each, ``keys`` as the index; default: the fields the sweep swept): n,
    and each column's mean and 95% CI half-width over seeds; the cell picked on validation (``best``)
    is flagged. Failed runs are left out of ``n`` and the means; ``failed`` counts each cell's (0
    where none did), and where any run failed, ``failed_seeds`` names them.
    A cell a pruned sweep stopped early shows the epoch in ``pruned_at``: its accuracies are from there."""
    if keys is None:
        if "keys" not in df.attrs:
            raise ValueError("this table does not say which fields it swept: pass keys=[...] (e.g. ['T', 'kd_weight'])")
        keys = df.attrs["keys"]
    failed = failed_rows(df)
    trained = df[~failed]
    groups = trained.groupby(list(keys))
    cells = df.groupby(list(keys)).size().index  # every cell, even one whose every run failed
    table = groups.size().reindex(cells, fill_value=0).to_frame("n")
    for col in columns:
        table[col] = groups[col].mean().reindex(cells)
        table[f"{col}_ci95"] = groups[col].agg(ci95).reindex(cells)
    lost = df[failed].groupby(list(keys))
    table[FAILED] = lost.size().reindex(cells, fill_value=0) if failed.any() else 0
    if failed.any():
        seeds = lost["seed"].agg(lambda s: ", ".join(str(v) for v in sorted(s))) if "seed" in df else lost.size() * ""
        table["failed_seeds"] = seeds.reindex(cells, fill_value="")
    if "pruned_at" in df and df["pruned_at"].notna().any():  # its accuracies are at that epoch, not the end
        table["pruned_at"] = df.groupby(list(keys))["pruned_at"].max().reindex(cells)
    if "best" in df:
        table["picked"] = df.groupby(list(keys))["best"].any().map({True: "← picked", False: ""})
    return table


def compare_columns(
    df: pd.DataFrame, by: str, baseline: str, columns: Sequence[str], bound: float | None = None
) -> pd.DataFrame:
    """Per-seed measurements (one row per ``by`` group and ``seed``) compared with the ``baseline``
    group, paired by seed: one row per (group, column) with n, the mean difference, its 95% CI, p
    and ``Paired.verdict(bound)``."""

    def values(group, col):
        rows = df[df[by] == group]
        return dict(zip(rows["seed"], rows[col], strict=True))

    out = {}
    for group in dict.fromkeys(df[by]):
        if group == baseline:
            continue
        for col in columns:
            out[(group, col)] = _paired_row(compare(values(group, col), values(baseline, col)), bound)
    return pd.DataFrame.from_dict(out, orient="index")


def paired_table(
    pairs: Mapping[str, tuple[Sequence, Sequence]],
    metric: str = "last_top1",
    bound: float | None = None,
    neutral: Collection[str] = (),
) -> pd.DataFrame:
    """Named comparisons ``{"KD − independent": (kd_runs, independent_runs)}``, each ``a - b`` paired
    by seed: one row per name with n, the mean difference, its 95% CI, p and ``Paired.verdict(bound)``
    (where a run failed, column ``failed_seeds`` names the seeds left out). A section's comparisons
    in one table. A detected difference reads "better"/"worse", except for the names in ``neutral``
    (a quantity with no better direction, such as the disagreement of two students): "higher"/"lower"."""
    unknown = set(neutral) - set(pairs)
    if unknown:
        raise ValueError(f"neutral names {sorted(unknown)} are not comparisons of this table: {list(pairs)}")
    rows = {}
    for name, (a, b) in pairs.items():
        c = compare(a, b, metric)
        words = ("higher", "lower") if name in neutral else ("better", "worse")
        rows[name] = _paired_row(c, bound, words) | {"failed_seeds": ", ".join(map(str, c.failed))}
    table = pd.DataFrame.from_dict(rows, orient="index")
    if not any(r["failed_seeds"] for r in rows.values()):
        table = table.drop(columns="failed_seeds", errors="ignore")
    return table


def compare_table(
    groups: Mapping[str, Sequence], baseline: str, metric: str = "last_top1", bound: float | None = None
) -> pd.DataFrame:
    """Each group against ``baseline``, paired by seed (``paired_table``): one row per group."""
    pairs = {f"{name} − {baseline}": (runs, groups[baseline]) for name, runs in groups.items() if name != baseline}
    return paired_table(pairs, metric, bound)


def compare_nested(
    a: Mapping[str, Sequence], b: Mapping[str, Sequence], metric: str = "last_top1", bound: float | None = None
) -> pd.DataFrame:
    """``a - b`` with students nested in teachers: ``a``/``b`` map a teacher to its students' runs
    (anything ``compare`` takes). One row per teacher (paired by student seed), then a "pooled" row.

    Pooled is the two-stage estimate for a balanced nested design: the mean over teachers of the
    per-teacher mean differences d_t, with a t CI over teachers, mean(d) ± t_{T-1} sd(d) / sqrt(T).
    Its variance holds the teacher-to-teacher spread as well as the students', so with two teachers
    the CI is wide (t_1 = 12.7): that width is what one more teacher buys down. ``same_verdict``
    says whether every teacher's own verdict agrees."""
    if set(a) != set(b):
        raise ValueError(f"a has teachers {sorted(a)}, b has {sorted(b)}: both sides need the same teachers")
    per = {t: compare(a[t], b[t], metric) for t in a}
    rows = {t: {"mean_a": c.mean_a, "mean_b": c.mean_b} | _paired_row(c, bound) for t, c in per.items()}
    pooled = compare([c.diff for c in per.values()], [0.0] * len(per))
    means = {k: float(np.mean([getattr(c, k) for c in per.values()])) for k in ("mean_a", "mean_b")}
    rows["pooled"] = means | _paired_row(pooled, bound)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table["same_verdict"] = len({rows[t]["verdict"] for t in per}) == 1
    return table


def nested_table(
    pairs: Mapping[str, tuple[Mapping[str, Sequence], Mapping[str, Sequence]]],
    metric: str = "last_top1",
    bound: float | None = None,
) -> pd.DataFrame:
    """Named ``compare_nested`` comparisons in one table, ``{"LS-KD − KD": (ls_by_teacher, kd_by_teacher)}``:
    rows indexed by (comparison, teacher), each comparison's per-teacher rows then its pooled row."""
    return pd.concat(
        {name: compare_nested(a, b, metric, bound) for name, (a, b) in pairs.items()}, names=["comparison", "teacher"]
    )


def _paired_row(c: Paired, bound: float | None, words: tuple[str, str] = ("higher", "lower")) -> dict:
    """A comparison as a table row: n, the mean difference, its 95% CI, p and the verdict."""
    return {
        "n": c.n,
        "diff": c.diff,
        "ci_low": c.ci_low,
        "ci_high": c.ci_high,
        "p": c.p,
        "verdict": c.verdict(bound, words),
    }


def plot_seeds(ax, results: Sequence, column: str, label: str | None = None, **style):
    """Mean over seeds of one per-epoch metric, with a ±1 std band; returns the line."""
    values = pd.concat([r.history.set_index("epoch")[column] for r in results], axis=1)
    mean, std = values.mean(axis=1), values.std(axis=1).fillna(0)
    (line,) = ax.plot(mean.index, mean, label=label, **style)
    ax.fill_between(mean.index, mean - std, mean + std, alpha=0.2, color=line.get_color())
    return line


# ----------------------------------------------------------------------------- diagnostics from outputs


def top1_agreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """Percentage of samples on which two models predict the same class."""
    return 100 * (logits_a.argmax(1) == logits_b.argmax(1)).float().mean().item()


def per_sample_kl(logits_s: torch.Tensor, logits_t: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """KL(softmax(z_t/T) ‖ softmax(z_s/T)) of every sample, (N,)."""
    log_p_s = F.log_softmax(logits_s.double() / T, dim=1)  # (N, K)
    log_p_t = F.log_softmax(logits_t.double() / T, dim=1)  # (N, K)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).float()


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..K-1 along each row, tied values sharing the mean of their positions (as scipy's
    ``rankdata(method="average")``), so the result does not depend on the order of the ties."""
    ordered = x.sort(dim=1).values.contiguous()  # (N, K)
    below = torch.searchsorted(ordered, x.contiguous(), right=False)  # (N, K) values strictly smaller
    upto = torch.searchsorted(ordered, x.contiguous(), right=True)  # (N, K) values smaller or equal
    return (below + upto - 1).double() / 2


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each row of ``a`` with the same row of ``b``, (N,): the
    Pearson correlation of average ranks (``average_ranks``), vectorised; nan for a constant row."""
    ra, rb = average_ranks(a), average_ranks(b)  # (N, K)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return ((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))).float()


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE (%): Σ_b |B_b|/N · |accuracy(B_b) - confidence(B_b)| over equal-width confidence bins."""
    conf, pred = logits.float().softmax(1).max(1)
    correct = (pred == labels).float()
    bins = (conf * n_bins).long().clamp(max=n_bins - 1)  # (N,) bin of each sample
    count = torch.bincount(bins, minlength=n_bins).float()
    gap = torch.bincount(bins, weights=correct - conf, minlength=n_bins).abs()  # |Σ (acc - conf)| per bin
    return 100 * (gap.sum() / count.sum()).item()


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> pd.DataFrame:
    """The reliability diagram's data: per equal-width confidence bin, its mean confidence, its
    accuracy (%) and its sample count (empty bins left out); ``expected_calibration_error`` is the
    count-weighted mean |accuracy - confidence| of these rows."""
    conf, pred = logits.float().softmax(1).max(1)
    correct = (pred == labels).float()
    bins = (conf * n_bins).long().clamp(max=n_bins - 1)  # (N,)
    count = torch.bincount(bins, minlength=n_bins).double()
    mean_conf = torch.bincount(bins, weights=conf.double(), minlength=n_bins) / count.clamp(min=1)
    accuracy = torch.bincount(bins, weights=correct.double(), minlength=n_bins) / count.clamp(min=1)
    table = pd.DataFrame(
        {
            "bin_low": np.arange(n_bins) / n_bins,
            "confidence": 100 * mean_conf.numpy(),
            "accuracy": 100 * accuracy.numpy(),
            "count": count.numpy().astype(int),
        }
    )
    return table[table["count"] > 0].reset_index(drop=True)


def output_stats(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> dict:
    """One model's test outputs in numbers: top-1 (%), NLL, mean confidence (%), ECE (%), and, given
    the teacher's logits, top-1 agreement with it (%) and the mean and median KL(teacher ‖ model) at T = 1."""
    conf = logits.float().softmax(1).max(1).values
    out = {
        "top1": 100 * (logits.argmax(1) == labels).float().mean().item(),
        "nll": F.cross_entropy(logits.float(), labels).item(),
        "confidence": 100 * conf.mean().item(),
        "ece": expected_calibration_error(logits, labels),
    }
    if teacher_logits is not None:
        kl = per_sample_kl(logits, teacher_logits)
        out |= {
            "agreement": top1_agreement(logits, teacher_logits),
            "kl_mean": kl.mean().item(),
            "kl_median": kl.median().item(),
        }
    return out


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-sample z-score over classes: (z - mean_k z) / (std_k z + eps), unbiased std as Sun et al.
    (CVPR 2024); bf16/fp16 logits are computed in fp32."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)  # (N, K)


def logit_relation(logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict:
    """How a model's logits relate to the teacher's, beyond the top-1: mean KL(teacher ‖ model) on raw
    and on standardised (per-sample z-scored) logits at T = 1, mean Spearman ρ of the logit vectors, and
    the mean per-sample std of the model's logits (its scale)."""
    return {
        "kl_raw": per_sample_kl(logits, teacher_logits).mean().item(),
        "kl_standardised": per_sample_kl(standardize(logits), standardize(teacher_logits)).mean().item(),
        "spearman": spearman_rows(logits, teacher_logits).nanmean().item(),
        "logit_std": logits.float().std(1).mean().item(),
    }


def logit_conflicts(teacher, kd, independent, labels, standardized=None, T: float = 3.0) -> dict:
    """Samples where matching the teacher's logits misleads, as the seed notebook defines them.

    A conflict: the KD student is closer to the teacher than the independent student,
    KL_T(p_t ‖ p_kd) < KL_T(p_t ‖ p_ind), yet predicts a class that neither the teacher nor the label
    supports, while the independent student matches the teacher or the label. ``reversed`` are the
    conflicts on which the standardised KL (z-scored logits, same T) ranks the independent student
    closer: the ranking logit standardisation would have corrected. Given a trained standardised
    student's logits, ``agreement`` is its top-1 agreement (%) with the teacher on the conflicts.
    All arguments (N, K) logits on one split, ``labels`` (N,).
    """
    t_pred, kd_pred, ind_pred = teacher.argmax(1), kd.argmax(1), independent.argmax(1)
    closer = per_sample_kl(kd, teacher, T) < per_sample_kl(independent, teacher, T)
    unsupported = (kd_pred != t_pred) & (kd_pred != labels)
    mask = closer & unsupported & ((ind_pred == t_pred) | (ind_pred == labels))  # (N,)
    zt = standardize(teacher)
    flipped = per_sample_kl(standardize(kd), zt, T) > per_sample_kl(standardize(independent), zt, T)
    out = {"samples": len(labels), "conflicts": int(mask.sum()), "reversed": int((mask & flipped).sum()), "mask": mask}
    if standardized is not None:
        agree = standardized.argmax(1)[mask] == t_pred[mask]
        out["agreement"] = 100 * agree.float().mean().item() if mask.any() else math.nan
    return out


def conflict_analysis(teacher: torch.Tensor, kd: torch.Tensor, independent: torch.Tensor, standardized) -> dict:
    """Where matching the teacher's logits misleads (all arguments: test-set logits, (N, K)).

    A conflict is a sample on which the KD student is *closer* to the teacher in KL than the
    independent student, yet predicts a different class than the teacher while the
    independent student agrees with it: a small divergence that still loses the ranking.
    ``corrected`` counts the conflicts on which the logit-standardised student agrees.
    """
    t_pred = teacher.argmax(1)
    closer = per_sample_kl(kd, teacher) < per_sample_kl(independent, teacher)
    mask = closer & (kd.argmax(1) != t_pred) & (independent.argmax(1) == t_pred)  # (N,)
    corrected = mask & (standardized.argmax(1) == t_pred)
    return {"samples": len(t_pred), "conflicts": int(mask.sum()), "corrected": int(corrected.sum()), "mask": mask}


def _centred(gram: torch.Tensor) -> torch.Tensor:
    """H K H with H = I − 11ᵀ/n: the Gram matrix of the centred features."""
    return gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean()


def _cka(k: torch.Tensor, ell: torch.Tensor) -> float:
    kc, lc = _centred(k), _centred(ell)
    return ((kc * lc).sum() / (kc.norm() * lc.norm())).item()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., ICML 2019) of two representations of the same n inputs.

    CKA = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)) with K = XXᵀ, L = YYᵀ of centred features;
    1 for representations equal up to rotation and isotropic scaling; any widths.
    """
    x, y = x.double(), y.double()
    return _cka(x @ x.t(), y @ y.t())  # (n, n) Gram matrices: cheaper than (D, D) for wide maps


def _hsic_unbiased(k: torch.Tensor, ell: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Song et al.'s (JMLR 2012) unbiased HSIC of (n, n) Gram matrices, up to the factor 1/(n(n−3))
    (it cancels in CKA); ``same`` (n, n) marks the pairs of one image (the diagonal, and repeats
    in a bootstrap resample), which the estimator leaves out."""
    k, ell = k.masked_fill(same, 0), ell.masked_fill(same, 0)
    n = len(k)
    return (k * ell).sum() + k.sum() * ell.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * (k.sum(0) * ell.sum(0)).sum()


def _debiased_cka(k: torch.Tensor, ell: torch.Tensor, same: torch.Tensor) -> float:
    hsic = _hsic_unbiased(k, ell, same) / (_hsic_unbiased(k, k, same) * _hsic_unbiased(ell, ell, same)).sqrt()
    return hsic.item()


def debiased_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA from unbiased HSIC estimates (Nguyen, Raghu & Kornblith, ICLR 2021): the plain
    estimate (``linear_cka``) is biased upwards at finite n, and more so on a bootstrap resample,
    whose repeated images look perfectly similar."""
    x, y = x.double(), y.double()
    return _debiased_cka(x @ x.t(), y @ y.t(), torch.eye(len(x), dtype=torch.bool))


def cka_bootstrap(xs: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor, n_boot: int = 200, seed: int = 0) -> dict:
    """Debiased linear CKA of each representation in ``xs`` (e.g. one per student seed) with ``y``,
    their mean, and a 95% percentile bootstrap CI of that mean over the n images. Each resample is
    shared by all of ``xs`` (the CI is over images, not seeds) and scored without the pairs of an
    image with its own repeats, which would otherwise inflate the resampled CKA."""
    xs = [xs] if isinstance(xs, torch.Tensor) else list(xs)
    grams = [x.double() @ x.double().t() for x in xs]  # (n, n) each
    ell = y.double() @ y.double().t()  # (n, n)
    n = len(y)
    per_x = [_debiased_cka(k, ell, torch.eye(n, dtype=torch.bool)) for k in grams]
    g = torch.Generator().manual_seed(seed)
    boots = []
    for _ in range(n_boot):
        i = torch.randint(n, (n,), generator=g)
        same = i[:, None] == i[None, :]  # (n, n)
        boots.append(np.mean([_debiased_cka(k[i][:, i], ell[i][:, i], same) for k in grams]))
    low, high = np.percentile(boots, [2.5, 97.5])
    return {"cka": float(np.mean(per_x)), "ci_low": float(low), "ci_high": float(high), "per_x": per_x}


def pairwise_disagreement(member_logits: Sequence[torch.Tensor]) -> float:
    """Mean over member pairs of the % of samples on which the two predict different classes."""
    preds = [z.argmax(1) for z in member_logits]
    pairs = list(itertools.combinations(preds, 2))
    if not pairs:
        return float("nan")
    return 100 * sum((a != b).float().mean().item() for a, b in pairs) / len(pairs)


def group_metrics(member_logits: Sequence[torch.Tensor], labels: torch.Tensor, teacher_logits=None) -> dict:
    """From each member's logits (N, K): every member's top-1, the logit-averaged ensemble's
    loss/top-1/top-5 and the probability-averaged one's top-1 (``top1_prob``), pairwise
    disagreement and, given the teacher's logits, the ensemble's top-1 agreement with the teacher."""
    stacked = torch.stack(list(member_logits)).float()  # (M, N, K)
    ens = stacked.mean(0)  # (N, K)
    probs = stacked.softmax(2).mean(0)  # (N, K)
    top5 = ens.topk(min(5, ens.shape[1]), dim=1).indices  # (N, 5)
    out = {
        "loss": F.cross_entropy(ens, labels).item(),
        "top1": 100 * (ens.argmax(1) == labels).float().mean().item(),
        "top5": 100 * (top5 == labels[:, None]).any(1).float().mean().item(),
        "top1_prob": 100 * (probs.argmax(1) == labels).float().mean().item(),
    }
    for i, z in enumerate(member_logits):
        out[f"top1_m{i}"] = 100 * (z.argmax(1) == labels).float().mean().item()
    out["disagreement"] = pairwise_disagreement(member_logits)
    if teacher_logits is not None:
        out["teacher_agreement"] = top1_agreement(ens, teacher_logits)
    return out


def r_squared(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 − Σ(pred − target)² / Σ(target − mean over samples)², pooled over all dimensions."""
    sse = (pred - target).pow(2).sum()
    sst = (target - target.mean(0)).pow(2).sum()
    return (1 - sse / sst).item()


# ----------------------------------------------------------------------------- runs


def term_table(groups: Mapping[str, Sequence], epochs: Sequence[str] = ("first", "last")) -> pd.DataFrame:
    """Each group's weighted loss terms (the loop's per-epoch means ``train_<term>``) at its first and
    last epoch, mean over the group's runs: one row per (group, epoch), one column per term and
    ``loss`` their sum, so the balance between the terms of every method is visible."""
    skip = {"train_top1", "train_images_per_s"}
    rows = []
    for name, runs in groups.items():
        for which in epochs:
            values = [r.history.iloc[0 if which == "first" else -1] for r in runs]
            terms = {
                c[6:]: np.mean([v[c] for v in values])
                for c in values[0].index
                if c.startswith("train_") and c not in skip
            }
            rows.append({"group": name, "epoch": int(values[0]["epoch"]), **terms})
    table = pd.DataFrame(rows).set_index(["group", "epoch"])
    return table[[c for c in table.columns if c != "loss"] + ["loss"]]
