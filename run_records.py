"""Finished runs' per-epoch metrics kept as a small committed CSV, so that a grid trained in one
working session is read back in the next on a machine without its ``runs/`` (sessions here may start
on a fresh machine, and a notebook's grid and its confirmation runs do not fit in one).

A record holds, per run, the rows of its ``metrics.csv`` under a key: the run's identity
(``run_folders.run_identity``) with the teacher named by its run folder (its recipe, seed and data)
instead of the digest of its weights. A teacher retrained from the same recipe on another processor
has other bits, so a recorded grid run is a run *of that recipe*, not of these weights: use records
for choices (a grid's pick on validation), and train the comparisons that report test accuracy
under the teacher at hand. Each row keeps the processor and commit that trained it.

    python run_records.py results/feature_distillation_grids.csv runs/*   # record finished folders
    sweep_grids(..., record="results/feature_distillation_grids.csv")     # read back, record the rest
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace

import pandas as pd

from atomic_files import atomic_write_text
from config import Config
from run_folders import run_identity, run_record, saved_config

KEY_COLUMNS = ["key", "run_name", "processor", "commit"]


def teacher_name(path: str) -> str:
    """The teacher's run folder name (``…/vgg13-w0.25-ce-s0-82f5f549[/checkpoint.pt]``): its recipe."""
    path = os.path.normpath(path)
    return os.path.basename(os.path.dirname(path) if path.endswith(".pt") else path)


def record_key(cfg: Config) -> str:
    """What a run computes, its teacher named by recipe rather than by weights (see the module doc)."""
    ident = run_identity(replace(cfg, teacher=""))
    if cfg.teacher:
        ident["teacher"] = teacher_name(cfg.teacher)
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


@functools.cache
def code_commit() -> str:
    """The commit of the code this process runs, ``+changes`` if a tracked Python file had edits (a
    record's own CSV changing under a running grid is not a code change): read once, at the first call,
    which ``RunRecords`` makes when it opens a record (a grid's start, not hours later when its rows
    are written and HEAD may have moved)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        status = ["git", "status", "--porcelain", "-uno", "--", "*.py"]
        dirty = subprocess.run(status, cwd=here, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return sha.stdout.strip() + ("+changes" if dirty.stdout.strip() else "") if sha.returncode == 0 else "unknown"


class RunRecords:
    """The record file at ``path`` (absent: empty). ``history(cfg)`` reads a run back, ``add`` keeps
    one (the longer history wins), ``save`` writes the file atomically."""

    def __init__(self, path: str):
        self.path = path
        # as text: a commit such as 9e55246 would otherwise be read as the float 9 x 10^55246 (inf)
        text = dict.fromkeys(KEY_COLUMNS, str)
        self.rows = pd.read_csv(path, dtype=text) if os.path.isfile(path) else pd.DataFrame(columns=KEY_COLUMNS)
        self._commit = code_commit()
        self._processor = None
        self._added: set[str] = set()  # trained by this process: read back from their folders, not from here

    def lookup(self, cfg: Config) -> dict | None:
        """The run ``cfg`` describes as ``sweeps.run_many`` returns one (``run_dir``: where it was
        trained, ``history``: its metrics up to ``cfg.stop_after`` epochs if set, a pruning rung, else
        all ``cfg.epochs``) plus ``recorded`` (processor and commit); None where the record has fewer
        epochs than that, and for runs this process added (their folders are here)."""
        key = record_key(cfg)
        if key in self._added:
            return None
        rows = self.rows[self.rows["key"] == key]
        needed = cfg.stop_after or cfg.epochs
        if len(rows) < needed:
            return None
        hist = rows.drop(columns=KEY_COLUMNS).sort_values("epoch").head(needed)
        first = rows.iloc[0]
        return {
            "run_dir": os.path.join(cfg.out_dir, first["run_name"]),
            "history": hist.dropna(axis=1, how="all").reset_index(drop=True),
            "recorded": f"{first['processor']} at {first['commit']}",
        }

    def add(self, cfg: Config, history: pd.DataFrame, run_dir: str) -> None:
        key = record_key(cfg)
        self._added.add(key)
        if (self.rows["key"] == key).sum() >= len(history):
            return
        if self._processor is None:
            from cost import processor  # torch-heavy: only when something is recorded

            self._processor = processor()
        name = os.path.basename(os.path.normpath(run_dir))
        new = history.assign(key=key, run_name=name, processor=self._processor, commit=self._commit)
        kept = self.rows[self.rows["key"] != key]
        self.rows = pd.concat([kept, new[KEY_COLUMNS + list(history.columns)]], ignore_index=True) if len(kept) else new

    def save(self) -> None:
        """Write the record, merged under a lock with the file as it is now: processes that share a record
        (two method groups tuned side by side) each keep what the other added; per run, the longer
        history wins."""
        from runs import run_lock  # torch-heavy: only when something is saved

        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        with run_lock(folder):
            if os.path.isfile(self.path):
                self.rows = _longer_history(pd.read_csv(self.path, dtype=dict.fromkeys(KEY_COLUMNS, str)), self.rows)
            columns = KEY_COLUMNS + [c for c in self.rows.columns if c not in KEY_COLUMNS]
            atomic_write_text(self.path, self.rows[columns].to_csv(index=False))


def _longer_history(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``a`` and ``b``, each run's (key's) from whichever holds more of its epochs (``b`` on a tie)."""
    if not len(a):
        return b
    if not len(b):
        return a
    longer_in_a = a["key"].value_counts().gt(b["key"].value_counts().reindex(a["key"].unique(), fill_value=0))
    from_a = a["key"].map(longer_in_a)
    return pd.concat([b[~b["key"].isin(set(a.loc[from_a, "key"]))], a[from_a]], ignore_index=True)


def record_folders(path: str, run_dirs: list[str]) -> int:
    """Add every run folder with a config and metrics to the record at ``path``; returns how many."""
    records, added = RunRecords(path), 0
    for d in run_dirs:
        if not os.path.isfile(os.path.join(d, "config.json")):
            continue
        cfg, history = run_record(d)
        records.add(saved_config(cfg), history, d)
        added += 1
    records.save()
    return added


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("record", help="the CSV to add to (created if absent)")
    parser.add_argument("run_dirs", nargs="+", help="run folders (those without a config.json are skipped)")
    args = parser.parse_args(argv)
    n = record_folders(args.record, args.run_dirs)
    print(f"{args.record}: {n} runs recorded", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
