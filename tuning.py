"""A method tuned on validation around its released recipe: the grid, the pick, the edge extension.

    key = strength("dkd")                         # "nckd_weight": the one parameter that is tuned
    picks = tune({"dkd": cfg_dkd, "at": cfg_at})  # every grid of every method in one batch of runs

The tuned parameter is the method's distillation strength: the first of ``STRENGTHS`` whose recipe
value is set and non-zero (DKD's β, a feature method's weight, a logit method's KD weight, DIST's
inter-class weight; FSP and AB, whose loss after their init stage is CE alone, tune the share of the
run their init stage takes). Its grid is the recipe value times ``FACTORS`` (1/3, 1, 3), ``seeds``
runs per cell. The pick is the cell with the highest mean validation top-1 among the cells none of
whose runs failed. A pick at the edge of the values tried adds the next cell past it (×3 or ×1/3)
and picks again, up to ``MAX_EXTENSIONS`` times: a pick on the edge is extended before it counts.
Every batch is one ``run_many`` call, so runs that share a teacher and a data stream train together
(cohorts) across methods and cells. With a ``record`` (``run_records.py``) the grid's runs are kept in a
small CSV after each batch and read back from it, so a tuning that outlasts a working session resumes on
a machine without its run folders; the confirmation runs, which report test accuracy, always train here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import pandas as pd

from analysis import FAILED
from config import Config
from pruning import Prune, prune_runs
from registry import resolve_recipe
from run_records import RunRecords
from sweeps import recorded_batch, run_many, run_metrics

FACTORS = (1 / 3, 1.0, 3.0)
STEP = 3.0
MAX_EXTENSIONS = 2
STRENGTHS = ("nckd_weight", "feat_weight", "kd_weight", "inter_weight", "init_fraction")


def strength(cfg: Config) -> str:
    """The parameter tuned for ``cfg.method``: the first of ``STRENGTHS`` its recipe sets above 0."""
    recipe = resolve_recipe(cfg)
    for key in STRENGTHS:
        value = recipe.params.get(key)
        if value:
            return key
    raise ValueError(f"{cfg.method} has none of {', '.join(STRENGTHS)} set above 0 in its recipe: nothing to tune")


def recipe_value(cfg: Config, key: str) -> float:
    return float(resolve_recipe(cfg).params[key])


@dataclass
class Tuning:
    """One method's tuning: the parameter, the values tried, every run's row, the pick."""

    method: str
    key: str
    recipe: float
    values: list[float]
    rows: list[dict] = field(default_factory=list)
    pick: float | None = None
    extensions: int = 0

    def cell_means(self) -> pd.Series:
        """Mean validation top-1 per value over its runs; cells with a failed or pruned run are left out."""
        df = pd.DataFrame(self.rows)
        bad = set(df.loc[df[FAILED].notna(), "value"]) if FAILED in df else set()
        bad |= set(df.loc[df["pruned_at"].notna(), "value"]) if "pruned_at" in df else set()
        bad |= set(df.loc[df["val_top1"].isna(), "value"])
        ok = df[~df["value"].isin(bad)]
        return ok.groupby("value")["val_top1"].mean()

    def edge(self) -> float | None:
        """The value one step past the pick when it is the smallest or largest tried, else None."""
        if self.pick is None:
            return None
        if self.pick == max(self.values):
            return self.pick * STEP
        if self.pick == min(self.values):
            return self.pick / STEP
        return None


def cell_config(base: Config, t: Tuning, value: float, seed: int) -> Config:
    """The run of ``t``'s cell ``value`` at ``seed``: the recipe's own value stays unset, so that cell is
    the untuned run's folder."""
    extra = {} if not t.key or value == t.recipe else {t.key: value}
    return replace(base, seed=seed, data_seed=seed, **extra)


def _run(
    batch: list[tuple[Tuning, float, int, Config]],
    jobs,
    prune: Prune | None = None,
    records: RunRecords | None = None,
    method_cost: Mapping[str, float] | None = None,
) -> None:
    """Train a batch of (tuning, value, seed, config) in one ``run_many`` call per rung (``prune``: cells
    far behind their own method's best stop there, ``pruning.py``) and one to the end; a row per run
    into its tuning, a stopped run's with the epoch in ``pruned_at``. Runs that ``records`` holds are
    read from it (their row's ``recorded`` says where they trained); the others are added to it.
    ``method_cost``: each method's measured step relative to CE's, to share the work between workers."""

    def train(todo):
        return run_many(todo, jobs=jobs, desc="tuning", method_cost=method_cost)

    def run_batch(cfgs):
        return recorded_batch(records, cfgs, train)

    stopped, done = {}, {}
    if prune is not None:
        runs = [({"method": t.method, "value": value}, seed, cfg) for t, value, seed, cfg in batch]
        stopped, done = prune_runs(runs, prune, run_batch, by=("method",))
    rest = [i for i in range(len(batch)) if i not in done]
    done |= dict(zip(rest, run_batch([batch[i][3] for i in rest]), strict=True))
    for i, (t, value, seed, _) in enumerate(batch):
        res = done[i]
        row = {"method": t.method, "param": t.key, "value": value, "seed": seed, "run_dir": res.get("run_dir")}
        if "history" in res:
            row |= run_metrics(res["history"])
        else:
            row |= {"val_top1": float("nan"), "error": res["error"]}
        row |= {"recorded": res["recorded"]} if "recorded" in res else {}
        t.rows.append(row | ({"pruned_at": stopped[i]} if i in stopped else {}))


def tune(
    bases: dict[str, Config],
    seeds=range(3),
    jobs: int | str = "auto",
    prune: Prune | None = None,
    record: str | None = None,
    method_cost: Mapping[str, float] | None = None,
) -> dict[str, Tuning]:
    """Every method of ``bases`` (name -> its base config) tuned on validation; see the module docstring.
    ``prune``: each batch stops, at its rungs, the cells far behind their method's best (never the best).
    ``record``: a CSV of the grid's runs, read back and added to after each batch (``run_records.py``).
    ``method_cost``: each method's step relative to CE's (``cohorts.work_left``): how batches are shared."""
    records = RunRecords(record) if record else None
    tunings = {}
    for name, base in bases.items():
        key = strength(base)
        recipe = recipe_value(base, key)
        tunings[name] = Tuning(base.method, key, recipe, [recipe * f for f in FACTORS])
    first = [(t, v, s, cell_config(bases[n], t, v, s)) for n, t in tunings.items() for v in t.values for s in seeds]
    _run(first, jobs, prune, records, method_cost)
    for _ in range(MAX_EXTENSIONS + 1):
        batch = []
        for name, t in tunings.items():
            means = t.cell_means()
            t.pick = float(means.idxmax()) if len(means) else None
            nxt = t.edge()
            if nxt is not None and t.extensions < MAX_EXTENSIONS:
                t.values.append(nxt)
                t.extensions += 1
                batch += [(t, nxt, s, cell_config(bases[name], t, nxt, s)) for s in seeds]
        if not batch:
            break
        _run(batch, jobs, prune, records, method_cost)
    return tunings


def confirm(
    bases: dict[str, Config],
    tunings: dict[str, Tuning],
    seeds=range(5),
    jobs="auto",
    method_cost: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """Each picked setting (and every base without a tuning, e.g. CE) at ``seeds``; one row per run."""
    batch = []
    for name, base in bases.items():
        if name not in tunings:  # nothing tuned: the base config itself
            tunings[name] = Tuning(base.method, "", 0.0, [0.0], pick=0.0)
        t = tunings[name]
        if t.pick is not None:  # None: every cell failed, nothing to confirm
            batch += [(t, t.pick, s, cell_config(base, t, t.pick, s)) for s in seeds]
    kept = {id(t): len(t.rows) for t in tunings.values()}
    _run(batch, jobs, method_cost=method_cost)
    rows = [r for t in tunings.values() for r in t.rows[kept[id(t)] :]]
    return pd.DataFrame(rows)
