"""Cohorts: runs that share a data stream and a teacher train together, each exactly as alone."""

import glob
import os
import time
from dataclasses import replace

import pytest
import torch

import train_eval
from checkpoints import read_checkpoint
from conftest import HANG_SECONDS, assert_same_run
from distiller import distill, distill_together

MIXED = [
    ("ce", {}),
    ("kd", {}),
    ("dkd", {"warmup": 1.0}),
    ("fitnet", {}),
    ("at", {}),
    ("crd", {"crd_negatives": 128}),
    ("rkd", {}),
]


def configs(smoke_cfg, teacher, out_dir, methods=MIXED, **common):
    return [
        smoke_cfg(method=m, teacher=teacher, epochs=2, threads=1, out_dir=str(out_dir), **extra, **common)
        for m, extra in methods
    ]


def test_a_mixed_cohort_equals_its_solo_runs_to_the_bit(smoke_cfg, smoke_teacher, tmp_path):
    cfgs = configs(smoke_cfg, smoke_teacher.run_dir, tmp_path / "solo")
    solo = [distill(c) for c in cfgs]
    together = distill_together([replace(c, out_dir=str(tmp_path / "cohort")) for c in cfgs])
    for a, b in zip(solo, together, strict=True):
        assert_same_run(a, b)


def test_a_cohort_on_cached_teacher_logits_equals_its_solo_runs(smoke_cfg, smoke_teacher, tmp_path):
    methods = [("ce", {}), ("kd", {}), ("kd_ls", {}), ("dkd", {"warmup": 1.0})]
    cfgs = configs(smoke_cfg, smoke_teacher.run_dir, tmp_path / "solo", methods, teacher_cache=True)
    solo = [distill(c) for c in cfgs]
    together = distill_together([replace(c, out_dir=str(tmp_path / "cohort")) for c in cfgs])
    for a, b in zip(solo, together, strict=True):
        assert_same_run(a, b)


class Killed(BaseException):
    pass


def test_a_cohort_killed_between_its_members_checkpoints_resumes_to_the_same_bits(
    smoke_cfg, smoke_teacher, tmp_path, monkeypatch
):
    methods = [("kd", {}), ("crd", {"crd_negatives": 128}), ("ce", {})]
    cfgs = configs(smoke_cfg, smoke_teacher.run_dir, tmp_path / "solo", methods)
    solo = [distill(c) for c in cfgs]
    cohort = [replace(c, out_dir=str(tmp_path / "cohort")) for c in cfgs]
    saves, real_save = [], train_eval._save

    def killed_after_four_saves(*args, **kwargs):
        if len(saves) == 4:  # epoch 1 of every member, and epoch 2 of the first one only
            raise Killed
        saves.append(1)
        return real_save(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(train_eval, "_save", killed_after_four_saves)
        with pytest.raises(Killed):
            distill_together(cohort)
    for a, b in zip(solo, distill_together(cohort), strict=True):
        assert_same_run(a, b)


def test_a_member_that_diverges_stops_alone(smoke_cfg, smoke_teacher, tmp_path):
    methods = [("kd", {}), ("at", {"lr": 1e30}), ("ce", {})]
    cfgs = configs(smoke_cfg, smoke_teacher.run_dir, tmp_path / "solo", methods)
    together = distill_together([replace(c, out_dir=str(tmp_path / "cohort")) for c in cfgs])
    assert isinstance(together[1], FloatingPointError)
    for i in (0, 2):
        assert_same_run(distill(cfgs[i]), together[i])


def test_a_member_refused_at_its_start_leaves_no_folder(smoke_cfg, smoke_teacher, tmp_path):
    import os

    # FSP compares the teacher's and the student's channels one by one: refused at these widths
    cfgs = configs(smoke_cfg, smoke_teacher.run_dir, tmp_path, [("ce", {}), ("fsp", {})])
    ce, fsp = distill_together(cfgs)
    assert isinstance(fsp, ValueError) and os.path.isfile(os.path.join(ce.run_dir, "checkpoint.pt"))
    runs = sorted(set(os.listdir(tmp_path)) - {"teacher_checks"})
    assert runs == [os.path.basename(ce.run_dir)]  # no folder, no lock left for fsp


def test_finished_members_are_read_back_not_retrained(smoke_cfg, smoke_teacher, tmp_path):
    cfgs = configs(smoke_cfg, smoke_teacher.run_dir, tmp_path, [("kd", {}), ("ce", {})])
    first = distill(cfgs[0])
    before = read_checkpoint(first.run_dir)["metrics"]
    together = distill_together(cfgs)
    assert read_checkpoint(first.run_dir)["metrics"] == before  # same seconds: not trained again
    assert_same_run(first, together[0])


def test_the_teacher_runs_once_per_batch_for_the_whole_cohort(smoke_cfg, smoke_teacher, tmp_path, monkeypatch):
    from distiller import FrozenTeacher

    cfgs = configs(smoke_cfg, smoke_teacher.run_dir, tmp_path, [("kd", {}), ("at", {}), ("rkd", {}), ("ce", {})])
    calls, real_forward = [], FrozenTeacher.forward
    monkeypatch.setattr(
        FrozenTeacher, "forward", lambda self, x, features=False: calls.append(1) or real_forward(self, x, features)
    )
    results = distill_together(cfgs)
    steps = len(results[0].history) * (1000 // 64)  # epochs x full batches of the 1000 training images
    assert len(calls) == steps


def test_the_specialists_first_stage_joins_a_cohort_and_reads_its_teacher(
    smoke_cfg, smoke_teacher, tmp_path, monkeypatch
):
    from cohorts import plan_cohorts
    from distiller import FrozenTeacher

    partition = [("partition", {"members": 2}), ("partition", {"members": 2, "standardize_targets": True})]
    methods = [*partition, ("fitnet", {}), ("ce", {})]
    cfgs = configs(smoke_cfg, smoke_teacher.run_dir, tmp_path / "solo", methods, teacher_amp="bf16")
    assert plan_cohorts(cfgs) == [[0, 1, 2, 3]]
    solo = [distill(c) for c in cfgs]
    calls, real_forward = [], FrozenTeacher.forward
    monkeypatch.setattr(
        FrozenTeacher,
        "forward",
        lambda self, x, features=False: calls.append(len(x)) or real_forward(self, x, features),
    )
    together = distill_together([replace(c, out_dir=str(tmp_path / "cohort")) for c in cfgs])
    for a, b in zip(solo, together, strict=True):
        assert_same_run(a, b)
    assert type(together[0].model).__name__ == "Specialists" and "train_mse_1" in together[1].history
    # training batches (64 images) went through the teacher once each, for all four members
    assert calls.count(64) == len(together[0].history) * (1000 // 64)


def test_a_sweep_of_the_specialists_runner_trains_in_cohorts(smoke_cfg, smoke_teacher, tmp_path, monkeypatch):
    from distiller import FrozenTeacher
    from methods.specialists import partition_stage
    from sweeps import run_many

    methods = [("partition", {"members": 2}), ("partition", {"members": 2, "ce_weight": 1.0})]
    cfgs = configs(smoke_cfg, smoke_teacher.run_dir, tmp_path, methods, teacher_amp="bf16")
    calls, real_forward = [], FrozenTeacher.forward
    monkeypatch.setattr(
        FrozenTeacher,
        "forward",
        lambda self, x, features=False: calls.append(len(x)) or real_forward(self, x, features),
    )
    out = run_many(cfgs, jobs=1, run=partition_stage)  # as Multiple_Students calls it
    assert all("history" in o for o in out) and len({o["run_dir"] for o in out}) == 2
    assert calls.count(64) == len(out[0]["history"]) * (1000 // 64)  # one teacher pass for both


@pytest.mark.parametrize("cached", [True, False])
def test_mutual_learning_cohorts_join_a_cohort_of_their_stream(smoke_cfg, smoke_teacher, tmp_path, cached):
    from cohorts import plan_cohorts

    methods = [("ce", {}), ("kd", {}), ("dml", {"members": 2}), ("dml+kd", {"members": 2})]
    online = {} if cached else {"teacher_amp": "bf16"}
    cfgs = configs(smoke_cfg, smoke_teacher.run_dir, tmp_path / "solo", methods, teacher_cache=cached, **online)
    assert plan_cohorts(cfgs) == [[0, 1, 2, 3]]
    solo = [distill(c) for c in cfgs]
    together = distill_together([replace(c, out_dir=str(tmp_path / "cohort")) for c in cfgs])
    for a, b in zip(solo, together, strict=True):
        assert_same_run(a, b)
    assert {"test_top1_m0", "test_top1_m1", "train_peer_1"} <= set(together[3].history.columns)


def test_plan_groups_by_stream_and_teacher_and_splits_for_idle_workers(smoke_cfg):
    from cohorts import plan_cohorts

    base = smoke_cfg(teacher="runs/t", epochs=2)
    cfgs = [
        replace(base, method="kd", seed=0, data_seed=0),  # 0: stream 0
        replace(base, method="at", seed=0, data_seed=0),  # 1: stream 0, same teacher
        replace(base, method="ce", seed=0, data_seed=0),  # 2: no teacher: joins stream 0's cohort
        replace(base, method="kd", seed=1, data_seed=1),  # 3: another stream
        replace(base, method="kd", seed=0, data_seed=0, teacher_amp="bf16"),  # 4: another precision
        replace(base, method="specialists", members=2, init_from="x", seed=0, data_seed=0),  # 5: a runner of its own
        replace(base, method="dml", members=2, seed=0, data_seed=0),  # 6: no teacher: joins stream 0's cohort
    ]
    assert plan_cohorts(cfgs, workers=1) == [[0, 1, 2, 6], [3], [4], [5]]
    # 5 workers: split by work, where runs of two members (dml, specialists) weigh two
    assert sorted(map(len, plan_cohorts(cfgs, workers=5))) == [1, 1, 1, 1, 1, 2]


def test_plan_splits_a_cohort_when_the_last_round_would_leave_a_worker_idle(smoke_cfg):
    from cohorts import makespan, plan_cohorts

    # three seeds of 20 cached-logit runs (no teacher forward to repeat) on 2 workers: 20 + 20 | 20
    # ends at 40 member steps (+ streams); halving the first cohort gives 10 + 20 | 10 + 20: 30
    base = smoke_cfg(method="kd", teacher="runs/t", teacher_cache=True, epochs=2)
    cfgs = [replace(base, T=1.0 + t, seed=s, data_seed=s) for s in range(3) for t in range(20)]
    plan = plan_cohorts(cfgs, workers=2)
    assert sorted(map(len, plan)) == [10, 10, 20, 20] and sorted(i for c in plan for i in c) == list(range(60))
    assert makespan(plan, set(), 2) == pytest.approx(30.2)
    assert plan_cohorts(cfgs, workers=1) == [list(range(s * 20, s * 20 + 20)) for s in range(3)]  # one worker: no gain
    # with the teacher online, a split repeats its forward (about one member step): still worth it here
    online = [replace(c, teacher_cache=False) for c in cfgs]
    assert sorted(map(len, plan_cohorts(online, workers=2))) == [10, 10, 20, 20]
    assert sorted(map(len, plan_cohorts(online[:40], workers=2))) == [20, 20]  # two cohorts: nothing to gain


def test_a_sweep_in_cohorts_gives_the_runs_it_gives_one_by_one(smoke_cfg, smoke_teacher, tmp_path):
    from sweeps import sweep

    base = smoke_cfg(method="at", teacher=smoke_teacher.run_dir, epochs=1, threads=1)
    grid = {"feat_weight": [10.0, 100.0], "method": ["at", "sp"]}
    one_by_one = sweep(replace(base, out_dir=str(tmp_path / "a")), grid, seeds=[0], jobs=1, cohorts=False)
    in_cohorts = sweep(replace(base, out_dir=str(tmp_path / "b")), grid, seeds=[0], jobs=2)
    for col in ("val_top1", "test_top1", "val_loss"):
        assert one_by_one[col].tolist() == in_cohorts[col].tolist()
    assert one_by_one.attrs["best"] == in_cohorts.attrs["best"]


def test_test_is_read_at_the_end_and_at_the_picked_epoch_and_training_is_unchanged(smoke_cfg, tmp_path):
    from analysis import summarize
    from train_eval import train

    every = train(smoke_cfg(epochs=4, eval_test="every", out_dir=str(tmp_path / "every")))
    end = train(smoke_cfg(epochs=4, out_dir=str(tmp_path / "end")))  # the default: "end"
    assert end.run_dir.split("/")[-1] == every.run_dir.split("/")[-1]  # the same run: when test is read is not
    a, b = every.history, end.history
    for col in [c for c in a if c.startswith(("train_", "val_")) and c != "train_images_per_s"] + ["lr"]:
        assert a[col].tolist() == b[col].tolist(), col
    picked = int(a["val_top1"].idxmax())
    read = sorted({picked, len(a) - 1})
    assert b["test_top1"].notna().tolist() == [i in read for i in range(len(b))]
    for i in read:
        assert b.loc[i, "test_top1"] == a.loc[i, "test_top1"] and b.loc[i, "test_loss"] == a.loc[i, "test_loss"]
    assert summarize(a)["best_top1"] == summarize(b)["best_top1"]
    for x, y in zip(every.model.state_dict().values(), end.model.state_dict().values(), strict=True):
        assert torch.equal(x, y)


def test_new_teachers_train_in_parallel_at_one_thread_and_finished_ones_are_read_back(smoke_cfg, tmp_path):
    from experiment import teacher_config, train_teachers
    from runs import train

    base = teacher_config(smoke_cfg(teacher_epochs=1, teacher_threads=2, out_dir=str(tmp_path)))
    first = train(base)  # already trained at its own 2 threads: read back as it is
    a, b, c = train_teachers([base, replace(base, seed=1, data_seed=1), replace(base, seed=2, data_seed=2)], jobs=2)
    assert a.run_dir == first.run_dir and a.config.threads == 2
    assert b.config.threads == c.config.threads == 1 and len({a.run_dir, b.run_dir, c.run_dir}) == 3
    assert b.config.seed == 1 and c.config.seed == 2


def test_a_teacher_started_in_the_background_is_the_one_teacher_seeds_reads_back(smoke_cfg, tmp_path):
    from experiment import start_teachers, teacher_seeds

    cfg = smoke_cfg(teacher_epochs=2, out_dir=str(tmp_path))
    proc = start_teachers(cfg, [1])
    assert proc is not None and proc.is_alive()
    started = time.time()
    while not glob.glob(os.path.join(tmp_path, "*-s1-*", "config.json")) and time.time() - started < HANG_SECONDS:
        time.sleep(0.2)  # until the background process has begun training
    t1 = teacher_seeds(cfg, [1])[0]  # waits on the run folder the background process trains, then reads it
    proc.join(timeout=HANG_SECONDS)
    assert proc.exitcode == 0 and t1.config.seed == 1 and t1.config.threads == 1 and len(t1.history) == 2
    assert start_teachers(cfg, [1]) is None  # nothing left to train


def test_under_teachers_nests_each_config_s_seeds_in_each_teacher(smoke_cfg, tmp_path):
    from analysis import nested_table
    from experiment import teacher_config, train_teachers, under_teachers

    base = teacher_config(smoke_cfg(teacher_epochs=1, out_dir=str(tmp_path)))
    teachers = train_teachers([base, replace(base, seed=1, data_seed=1)], jobs=1)
    student = smoke_cfg(epochs=1, out_dir=str(tmp_path), teacher_cache=True)
    by = under_teachers(
        {"kd": replace(student, method="kd"), "dkd": replace(student, method="dkd", warmup=0.1)}, teachers, [0, 1], 1
    )
    assert list(by) == ["kd", "dkd"] and list(by["kd"]) == ["teacher 0", "teacher 1"]
    for name, method in (("kd", "kd"), ("dkd", "dkd")):
        for t, key in zip(teachers, ["teacher 0", "teacher 1"], strict=True):
            runs = by[name][key]
            assert [r.config.seed for r in runs] == [r.config.data_seed for r in runs] == [0, 1]
            assert {r.config.teacher for r in runs} == {t.run_dir} and {r.config.method for r in runs} == {method}
    table = nested_table({"dkd − kd": (by["dkd"], by["kd"])})
    assert list(table.index.get_level_values("teacher")) == ["teacher 0", "teacher 1", "pooled"]
    with pytest.raises(ValueError, match="distinct seeds"):
        under_teachers({"kd": student}, [teachers[0], teachers[0]], [0])


def test_plan_weighs_runs_by_the_training_they_have_left(smoke_cfg):
    # the capacity teachers: three sizes of seed 0 in one cohort, and seed 1's two runs, one of them
    # already finished. Counting members, 3 | 2 looks balanced and nothing is split; by the work left
    # (model size x epochs not trained), seed 0's cohort is nearly all of it, and is split
    from cohorts import makespan, plan_cohorts, work_left
    from run_folders import run_dir_for

    base = smoke_cfg(method="ce", epochs=4)
    sizes = [("vgg8", 0.125), ("vgg8", 0.25), ("vgg11", 0.25)]
    cfgs = [replace(base, model=m, width=w, seed=0, data_seed=0) for m, w in sizes]
    cfgs += [replace(base, model=m, width=w, seed=1, data_seed=1) for m, w in [("vgg8", 0.125), ("vgg13", 0.25)]]
    finished = run_dir_for(cfgs[4])
    os.makedirs(finished)
    with open(os.path.join(finished, "metrics.csv"), "w") as f:
        f.write("epoch\n" + "".join(f"{e}\n" for e in range(1, 5)))
    cost = work_left(cfgs)
    assert cost[4] == 0 and cost[0] == cost[3] and cost[0] < cost[1] < cost[2]
    plan = plan_cohorts(cfgs, workers=2)
    assert len([c for c in plan if set(c) <= {0, 1, 2}]) >= 2  # seed 0's sizes trained side by side
    assert makespan(plan, set(), 2, cost) < makespan([[0, 1, 2], [3, 4]], set(), 2, cost)


def test_plan_weighs_methods_by_their_measured_cost_and_starts_the_costliest(smoke_cfg):
    # three seeds, each one run of a method measured at 12 CE steps and five at one: by FLOPs all
    # eighteen look alike, and halving a seed's cohort by count leaves the costly run's half far longer
    from cohorts import makespan, plan_cohorts, work_left

    base = smoke_cfg(teacher="runs/t", epochs=2)
    cfgs = []
    for s in range(3):
        cfgs.append(replace(base, method="at", seed=s, data_seed=s))
        cfgs += [replace(base, method="kd", T=1.0 + t, seed=s, data_seed=s) for t in range(5)]
    measured = {"at": 12.0, "kd": 1.0}
    cost = work_left(cfgs, measured)
    assert cost[0] == 12 * cost[1] and work_left(cfgs) == [1.0] * 18
    online = set(range(18))  # every run reads its teacher online
    seen, blind = plan_cohorts(cfgs, 2, measured), plan_cohorts(cfgs, 2)
    assert sorted(i for c in seen for i in c) == list(range(18))
    assert makespan(seen, online, 2, cost) < makespan(blind, online, 2, cost)
    totals = [sum(cost[i] for i in c) for c in seen]
    assert totals == sorted(totals, reverse=True)  # the pool takes the costliest first
    assert plan_cohorts(cfgs, 1, measured) == sorted(plan_cohorts(cfgs, 1, measured))  # one worker: member order
