"""Every registered distillation method at once: one cohort of all of them equals their solo runs."""

from dataclasses import replace

from conftest import assert_same_run
from distiller import distill, distill_together
from registry import METHODS, loss_methods

# the values that fit the smoke profile's 2 epochs and 260 images; every other value is the recipe's
FIT = dict(subset=26, epochs=2, threads=1, warmup=1.0, ctkd_loops=1.0, crd_negatives=64)
OWN = {"fsp": {"width": 0.125}}  # FSP compares channels entry by entry: the smoke teacher's widths (vgg11 x1/8)


def every_method() -> list[str]:
    return sorted(m for m in loss_methods() if "+kd" not in m and METHODS[m].standalone)


def test_there_are_the_twenty_one_methods_and_fitnets_stage_one():
    assert len(every_method()) == 22 and "fitnet_stage1" in every_method()
    assert all(METHODS[m].source for m in every_method())  # each says where its recipe comes from


def test_a_cohort_of_every_method_equals_their_solo_runs_to_the_bit(smoke_cfg, smoke_teacher, tmp_path):
    cfgs = [
        smoke_cfg(method=m, teacher=smoke_teacher.run_dir, out_dir=str(tmp_path / "solo"), **FIT, **OWN.get(m, {}))
        for m in every_method()
    ]
    solo = [distill(c) for c in cfgs]
    together = distill_together([replace(c, out_dir=str(tmp_path / "cohort")) for c in cfgs])
    for cfg, a, b in zip(cfgs, solo, together, strict=True):
        assert not isinstance(b, Exception), (cfg.method, b)
        assert_same_run(a, b)
