"""Run folders: a run's identity, its folder name, and reading back what it wrote.

    runs/<name>/config.json     the run's config (``Config.to_dict``: fields and method parameters)
    runs/<name>/metrics.csv     one row per epoch
    runs/<name>/checkpoint.pt   the last epoch: weights, architecture, config, metrics, optimizer state

A run's name hashes its identity, the values that decide what it computes, so equal configs
share a folder and a finished run is found again instead of being retrained.
"""

from __future__ import annotations

import hashlib
import json
import os

import pandas as pd

import data_utils
from checkpoints import file_digest
from config import Config
from registry import METHODS, resolve_recipe

# Fields that do not change what a run computes, so they stay out of its identity.
NOT_IN_IDENTITY = {
    "profile",
    "out_dir",
    "name",
    "device",
    "data_dir",
    "download",
    "n_seeds",
    "teacher_model",
    "teacher_width",
    "teacher_epochs",
    "teacher_threads",
    "budget",
    "trust_teacher",  # the teacher's weights are in the identity
}
# Fields about the teacher: in a run's identity only where its method reads them (``Method.reads``).
TEACHER_FIELDS = frozenset({"teacher", "teacher_amp", "teacher_cache", "cache_dtype"})


def run_identity(cfg: Config) -> dict:
    """The values that decide what a run computes.

    Fields at their class default are left out, so adding a field (whose default keeps the old
    behaviour) leaves earlier runs reusable; so are the teacher fields its method does not read,
    and every method parameter at its declared default. The teacher enters as the digest of its
    weights, the data as the digest of its files.
    """
    cfg = resolve_recipe(cfg)
    method = METHODS.get(cfg.method)
    defaults = Config().fields_dict()
    ident = {k: v for k, v in cfg.fields_dict().items() if k not in NOT_IN_IDENTITY and v != defaults[k]}
    unused = TEACHER_FIELDS - method.reads
    if cfg.schedule != "multistep":
        unused |= {"milestones", "gamma"}
    for key in unused:
        ident.pop(key, None)
    for p in method.params:
        value = cfg.params.get(p.name)
        if value is not None and value != p.default:
            ident[p.name] = value
    if ident.get("teacher"):  # the teacher's weights, not where they lie: a retrained teacher is a new run
        ident["teacher"] = file_digest(cfg.teacher)
    try:
        ident["data"] = data_utils.data_digest(cfg.dataset, cfg.data_dir)
    except FileNotFoundError:
        pass  # no data yet: nothing is trained on this config until it exists (train prepares it first)
    return ident


def run_name(cfg: Config) -> str:
    """``cfg.name``, or ``<model>-w<width>[-k<members>]-<method>-s<seed>-<identity digest>``."""
    if cfg.name:
        return cfg.name
    digest = hashlib.sha1(json.dumps(run_identity(cfg), sort_keys=True).encode()).hexdigest()[:8]
    group = f"-k{cfg.members}" if cfg.members > 1 else ""
    return f"{cfg.model}-w{cfg.width:g}{group}-{cfg.method}-s{cfg.seed}-{digest}"


def run_dir_for(cfg: Config) -> str:
    return os.path.join(cfg.out_dir, run_name(cfg))


def same_run(saved: dict | None, cfg: Config) -> bool:
    """Whether a checkpoint's saved config describes the run ``cfg`` does."""
    return saved is not None and run_identity(Config(**saved)) == run_identity(cfg)


def load_history(run_dir: str) -> pd.DataFrame:
    """Per-epoch metrics of a run folder."""
    return pd.read_csv(os.path.join(run_dir, "metrics.csv"))


def load_config(run_dir: str) -> Config:
    """The config a run folder was trained with (written before or after the method parameters
    moved out of the fields: both are flat)."""
    with open(os.path.join(run_dir, "config.json")) as f:
        return Config(**json.load(f))
