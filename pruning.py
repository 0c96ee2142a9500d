"""Grids that stop hopeless cells early, deciding on validation only (successive halving with a noise rule).

    df = sweep(cfg, {"feat_weight": [1, 10, 100, 1000]}, seeds=range(3), prune=Prune())

Every cell trains to the first rung (a fraction of its schedule: ``Prune.rungs``); there, a cell is
stopped when the best cell's validation accuracy beats it on every seed by more than seed noise and
a margin: with ``d_s`` = val(best, s) - val(cell, s) over the seeds both finished, the cell stops if
``mean(d) - t(0.975, n-1) * sd(d) / sqrt(n) > margin``. The survivors go on to the next rung, where
the rule is applied again, and then to the end. Why this rule:

- seeds are paired (same initialisation and data stream in every cell), so the paired gap's CI
  measures whether the cell is behind on *these* seeds, not whether two noisy means differ;
- early in the schedule (high learning rate) validation accuracy is noisy and close cells can
  still swap ranks, so the gap must also exceed ``margin`` points (default 2), not just be real;
- with one seed there is no noise estimate: nothing is stopped;
- the best cell at a rung is never stopped, so the cell the grid picks always trains in full; a
  cell that would have overtaken the best from more than ``margin`` points behind on every seed
  is the risk, and the default margin and rungs keep it small (docs/protocol.md).

A stopped run is an ordinary paused run folder (``stop_after``): rerunning the sweep without
``prune`` resumes it to the end of its schedule, bit-identical to a run never stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import stats

from config import Config


@dataclass(frozen=True)
class Prune:
    """Where a grid checks its cells (fractions of the schedule) and how far behind stops one (points)."""

    rungs: tuple[float, ...] = (0.25, 0.5)
    margin: float = 2.0

    def __post_init__(self):
        if not self.rungs or any(not 0 < f < 1 for f in self.rungs):
            raise ValueError(f"prune rungs are fractions of the schedule in (0, 1), e.g. (0.25, 0.5); got {self.rungs}")
        if not (self.margin >= 0 and math.isfinite(self.margin)):
            raise ValueError(f"prune margin is in points of validation accuracy, >= 0; got {self.margin}")

    def epochs(self, total: int) -> list[int]:
        """The rungs as epochs of a ``total``-epoch schedule: at least 1, before the last epoch, each once."""
        return sorted({max(1, round(f * total)) for f in self.rungs} - {total})


def behind(values: pd.DataFrame, keys: Sequence[str], margin: float) -> set[tuple]:
    """The cells (tuples of ``keys`` values) to stop, from one row per (cell, ``seed``) with ``val_top1``.

    Rows with a missing value (a run that failed) neither set the best nor are judged."""
    values = values.dropna(subset=["val_top1"])
    if values.empty:
        return set()
    table = values.pivot_table(index=list(keys), columns="seed", values="val_top1")  # cells x seeds
    best = table.mean(axis=1).idxmax()
    out = set()
    for cell, row in table.iterrows():
        gaps = (table.loc[best] - row).dropna().to_numpy()  # paired by seed
        n = len(gaps)
        if cell == best or n < 2:
            continue
        lower = gaps.mean() - stats.t.ppf(0.975, n - 1) * gaps.std(ddof=1) / math.sqrt(n)
        if lower > margin:
            out.add(cell if isinstance(cell, tuple) else (cell,))
    return out


def prune_runs(
    runs: list[tuple[dict, int, Config]],
    prune: Prune,
    run_batch: Callable[[list[Config]], list[dict]],
    by: Sequence[str] = (),
) -> tuple[dict[int, int], dict[int, dict]]:
    """Train ``runs`` (``sweeps.expand_grid``'s cells) rung by rung with ``run_batch`` (``run_many``).
    ``by``: cell keys that split the runs into grids judged apart (several methods' grids in one
    batch: each cell is compared with its own method's best only).

    Returns ``{run index: epoch it stopped at}`` for the pruned runs and each pruned or failed run's
    last result (``{"run_dir", "history"}`` or ``{"error"}``); the others are left at the last rung,
    to be trained to the end by the caller."""
    keys = list(runs[0][0]) if runs else []
    alive = list(range(len(runs)))
    stopped: dict[int, int] = {}
    results: dict[int, dict] = {}
    for epoch in prune.epochs(runs[0][2].epochs) if runs else []:
        done = run_batch([replace(runs[i][2], stop_after=epoch) for i in alive])
        rows = []
        for i, res in zip(alive, done, strict=True):
            cell, seed, _ = runs[i]
            results[i] = res
            rows.append({**cell, "seed": seed, "val_top1": _val_at(res, epoch)})
        frame = pd.DataFrame(rows)
        grids = [g for _, g in frame.groupby(list(by), sort=False)] if by else [frame]
        cut = set().union(*(behind(g, keys, prune.margin) for g in grids))
        for i in alive:
            if tuple(runs[i][0][k] for k in keys) in cut:
                stopped[i] = epoch
        # a run that failed here stays failed: its result is reported, it is not trained on
        alive = [i for i in alive if i not in stopped and "error" not in results[i]]
    return stopped, {i: r for i, r in results.items() if i in stopped or "error" in r}


def _val_at(result: dict, epoch: int) -> float:
    if "error" in result or "val_top1" not in result["history"]:
        return np.nan
    row = result["history"][result["history"]["epoch"] == epoch]
    return float(row["val_top1"].iloc[0]) if len(row) else np.nan
