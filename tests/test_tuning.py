"""Tuning around the recipe: which parameter, the grid, the pick on validation, the edge extension,
failed cells never picked, the confirmation at more seeds. Runs are faked (their validation top-1 a
function of the tuned value), so the rules are checked without training."""

import pandas as pd
import pytest

import tuning
from analysis import FAILED
from config import make_config


@pytest.mark.parametrize(
    ("method", "key", "recipe"),
    [("dkd", "nckd_weight", 6.0), ("at", "feat_weight", 1000.0), ("kd", "kd_weight", 0.9),
     ("dist", "inter_weight", 2.0), ("fsp", "init_fraction", 30 / 270), ("ab", "init_fraction", 30 / 270)],
)  # fmt: skip
def test_the_tuned_parameter_is_the_methods_strength(method, key, recipe):
    cfg = make_config("smoke", method=method, epochs=30)
    assert tuning.strength(cfg) == key and tuning.recipe_value(cfg, key) == pytest.approx(recipe)
    with pytest.raises(ValueError, match="nothing to tune"):
        tuning.strength(make_config("smoke", method="ce"))


class FakeRuns:
    """run_many replaced: a run's validation top-1 is ``score(method, value, seed)``; every config kept."""

    def __init__(self):
        self.configs = []
        self.costs = []  # the method_cost each call passed on
        self.score = lambda method, value, seed: 70.0

    def run_many(self, configs, jobs="auto", desc="", method_cost=None):
        self.configs.extend(configs)
        self.costs.append(method_cost)
        return [{"run_dir": f"runs/{c.method}-{i}", "history": c} for i, c in enumerate(configs)]

    def metrics(self, cfg):
        if cfg.method == "ce":
            return {"val_top1": self.score("ce", 0.0, cfg.seed)}
        key = tuning.strength(cfg)
        value = cfg.params.get(key, tuning.recipe_value(cfg, key))
        return {"val_top1": self.score(cfg.method, value, cfg.seed)}


@pytest.fixture
def fake_runs(monkeypatch):
    fake = FakeRuns()
    monkeypatch.setattr(tuning, "run_many", fake.run_many)
    monkeypatch.setattr(tuning, "run_metrics", fake.metrics)
    return fake


def test_an_edge_pick_is_extended_until_inside_or_twice(fake_runs):
    # at: the larger its weight the better (never inside: two extensions); dkd: best at recipe/3 (one extension)
    best = {"at": 1e9, "dkd": 2.0}
    fake_runs.score = lambda method, value, seed: 70 - abs(value - best[method]) / best[method] + 0.01 * seed
    bases = {m: make_config("smoke", method=m, epochs=30) for m in ("at", "dkd")}
    t = tuning.tune(bases, seeds=range(3), jobs=1, method_cost={"at": 2.0})
    assert fake_runs.costs == [{"at": 2.0}] * 3  # the grid and its two extensions: workers shared by measured cost
    assert t["at"].values == pytest.approx([1000 / 3, 1000, 3000, 9000, 27000]) and t["at"].extensions == 2
    assert t["at"].pick == pytest.approx(27000) and t["at"].edge() is not None  # still on the edge: it says so
    assert t["dkd"].values == pytest.approx([2, 6, 18, 2 / 3]) and t["dkd"].pick == pytest.approx(2)
    assert t["dkd"].edge() is None
    assert len(fake_runs.configs) == 3 * (5 + 4)  # 3 seeds per cell
    recipe_cells = [c for c in fake_runs.configs if c.method == "dkd" and "nckd_weight" not in c.params]
    assert len(recipe_cells) == 3  # the recipe's own cell is the untuned run: its value left unset


def test_a_cell_with_a_failed_run_is_never_picked():
    t = tuning.Tuning("at", "feat_weight", 1000.0, [1000 / 3, 1000.0, 3000.0])
    t.rows = [{"value": v, "seed": s, "val_top1": 80.0 if v == 3000.0 else 60.0} for v in t.values for s in range(3)]
    t.rows[-1][FAILED] = "at chance after 3 epochs"  # the best cell has a failed run
    means = t.cell_means()
    assert list(means.index) == pytest.approx([1000 / 3, 1000.0]) and isinstance(means, pd.Series)


def test_confirm_runs_each_pick_and_the_untuned_baselines_at_every_seed(fake_runs):
    bases = {"ce": make_config("smoke", method="ce"), "at": make_config("smoke", method="at")}
    picked = {"at": tuning.Tuning("at", "feat_weight", 1000.0, [1000.0], pick=3000.0)}
    df = tuning.confirm(bases, picked, seeds=range(5), jobs=1, method_cost={"at": 2.0})
    assert fake_runs.costs == [{"at": 2.0}]
    assert sorted(df.groupby("method")["seed"].apply(list).items()) == [("at", list(range(5))), ("ce", list(range(5)))]
    assert all(c.params.get("feat_weight") == 3000.0 for c in fake_runs.configs if c.method == "at")


class FakeEpochRuns(FakeRuns):
    """As FakeRuns, but each run has per-epoch rows up to its ``stop_after`` (a rung) or its end."""

    def run_many(self, configs, jobs="auto", desc="", method_cost=None):
        self.configs.extend(configs)
        out = []
        for i, c in enumerate(configs):
            val = super().metrics(c)["val_top1"]
            epochs = range(1, (c.stop_after or c.epochs) + 1)
            out.append({"run_dir": f"runs/{c.method}-{i}", "history": pd.DataFrame({"epoch": epochs, "val_top1": val})})
        return out

    def metrics(self, history):
        return {"val_top1": float(history["val_top1"].iloc[-1]), "epochs": len(history)}


def test_pruning_stops_cells_far_behind_their_own_methods_best(monkeypatch):
    fake = FakeEpochRuns()
    monkeypatch.setattr(tuning, "run_many", fake.run_many)
    monkeypatch.setattr(tuning, "run_metrics", fake.metrics)
    # at: 3000 is 15 points behind its best (1000); dkd's cells are within 1 point of each other but 5 below
    # at's best: judged against at's best they would all stop, against their own none does
    at = {1000 / 3: 74.0, 1000.0: 75.0, 3000.0: 60.0}
    fake.score = lambda m, v, s: at[min(at, key=lambda k: abs(k - v))] if m == "at" else 70 - abs(v - 2) / 12
    bases = {m: make_config("smoke", method=m, epochs=30, val_size=200) for m in ("at", "dkd")}
    t = tuning.tune(bases, seeds=range(3), jobs=1, prune=tuning.Prune())
    rows = pd.DataFrame(t["at"].rows + t["dkd"].rows)
    pruned = rows[rows["pruned_at"].notna()]
    assert set(zip(pruned["method"], pruned["value"], strict=True)) == {("at", 3000.0)}
    assert set(pruned["pruned_at"]) == {8}
    assert set(pruned["epochs"]) == {8}  # its row is the run as it stopped
    assert t["at"].pick == 1000.0 and t["dkd"].pick == pytest.approx(2.0)
    assert all(r["epochs"] == 30 for r in t["dkd"].rows)  # every dkd cell trained in full


def test_a_recorded_grid_is_read_back_without_training_on_a_machine_without_its_folders(monkeypatch, tmp_path):
    # a tuning that outlasts a session: the next, on a fresh machine, picks again from the record alone
    record = str(tmp_path / "grids.csv")
    at = {1000 / 3: 74.0, 1000.0: 75.0, 3000.0: 60.0}  # at x3 stops at its first rung: its record is 8 epochs
    bases = {m: make_config("smoke", method=m, epochs=30, val_size=200) for m in ("at", "dkd")}
    first = FakeEpochRuns()
    first.score = lambda m, v, s: at[min(at, key=lambda k: abs(k - v))] if m == "at" else 70 - abs(v - 2) / 12
    monkeypatch.setattr(tuning, "run_many", first.run_many)
    monkeypatch.setattr(tuning, "run_metrics", first.metrics)
    before = tuning.tune(bases, seeds=range(3), jobs=1, prune=tuning.Prune(), record=record)
    assert first.configs and "recorded" not in pd.DataFrame(before["at"].rows)
    assert pd.DataFrame(before["at"].rows)["pruned_at"].notna().sum() == 3

    fresh = FakeEpochRuns()
    fresh.score = lambda *_: pytest.fail("a recorded run was trained again")
    monkeypatch.setattr(tuning, "run_many", fresh.run_many)
    after = tuning.tune(bases, seeds=range(3), jobs=1, prune=tuning.Prune(), record=record)
    assert fresh.configs == []
    for m in bases:
        assert after[m].pick == before[m].pick and after[m].values == before[m].values
        rows = pd.DataFrame(after[m].rows)
        assert rows["recorded"].notna().all() and list(rows["val_top1"]) == [r["val_top1"] for r in before[m].rows]
        assert list(rows["epochs"]) == [r["epochs"] for r in before[m].rows]  # a pruned run as it stopped
