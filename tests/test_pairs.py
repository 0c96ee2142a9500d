"""The pairs table: the first pair of a profile is the profile, every pair builds and meets its
teacher's features, unknown names list the known ones, and the widths table in pairs.py's docstring
is what ``count_flops`` measures."""

import re
from dataclasses import replace

import pytest
import torch

import pairs
from config import PROFILES, make_config
from experiment import teacher_config
from model import count_flops, create_model
from registry import UnknownNameError
from run_folders import run_dir_for


@pytest.mark.parametrize("profile", list(pairs.PAIRS))
def test_a_profiles_first_pair_is_the_profile_itself(profile):
    first = pairs.get_pair(profile, pairs.default_pair(profile))
    assert first.fields() == {k: PROFILES[profile][k] for k in first.fields()}
    assert pairs.pair_config(profile, pairs.default_pair(profile)) == make_config(profile)


@pytest.mark.parametrize(("profile", "name"), [(p, n) for p, t in pairs.PAIRS.items() for n in t])
def test_every_pair_builds_and_sets_only_its_networks(profile, name):
    cfg = pairs.pair_config(profile, name, epochs=7)
    pair = pairs.get_pair(profile, name)
    assert (cfg.model, cfg.width) == pair.student and (cfg.teacher_model, cfg.teacher_width) == pair.teacher
    assert cfg.epochs == 7 and cfg.lr == (pair.student_lr or PROFILES[profile]["lr"])
    # the teacher trains at the profile's rate whatever the students': the demo's teacher serves vgg13-mv2
    assert teacher_config(cfg).lr == PROFILES[profile]["lr"]
    teacher = create_model(cfg.teacher_model, num_classes=10, width=cfg.teacher_width)
    student = create_model(cfg.model, num_classes=10, width=cfg.width)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        (_, ft), (_, fs) = teacher(x, features=True), student(x, features=True)
    assert len(ft["stages"]) == len(fs["stages"]) == 5
    # stages 2 and 3 meet at the same resolution (8, 4): a hint there needs no resampling
    assert [f.shape[-1] for f in ft["stages"][2:4]] == [f.shape[-1] for f in fs["stages"][2:4]] == [8, 4]


def test_the_mobilenet_pair_trains_its_students_at_the_release_rate_under_the_demos_teacher(tmp_path):
    """RepDistiller and mdistiller train MobileNetV2 students at lr 0.01; the teacher stays the demo's run."""
    cfg = pairs.pair_config("cpu", "vgg13-mv2", data_dir=str(tmp_path), out_dir=str(tmp_path))
    demo = make_config("cpu", data_dir=str(tmp_path), out_dir=str(tmp_path))
    assert cfg.lr == 0.01 and demo.lr == 0.05
    assert run_dir_for(teacher_config(cfg)) == run_dir_for(teacher_config(demo))
    # teacher_lr is the teacher's, so it is not part of a student's identity
    assert run_dir_for(replace(demo, teacher_lr=0.3)) == run_dir_for(demo)


def test_the_docstrings_flops_are_measured():
    rows = re.findall(r"^\| (\S+) \| .* \| ([\d.]+) \| [^|]+ \|$", pairs.__doc__, flags=re.M)
    assert [r[0] for r in rows] == list(pairs.PAIRS["cpu"])
    for name, mflops in rows:
        model, width = pairs.PAIRS["cpu"][name].student
        flops = count_flops(create_model(model, num_classes=10, width=width))
        assert flops / 1e6 == pytest.approx(float(mflops), abs=0.005)


def test_unknown_pair_or_profile_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="known: vgg13-vgg8, vgg16-vgg11, vgg13-mv2"):
        pairs.pair_config("cpu", "vgg19-vgg8")
    with pytest.raises(UnknownNameError, match="profiles with pairs: cpu, paper"):
        pairs.pairs("smoke")


def test_the_notebooks_setup_takes_a_pair(monkeypatch, tmp_path):
    import pandas as pd

    import experiment

    trained = []

    class Teacher:  # stands in for the trained teacher: the call is what is under test
        run_dir, history = "teacher-dir", pd.DataFrame({"test_top1": [80.0]})

    monkeypatch.setattr(experiment, "train", lambda cfg: trained.append(cfg) or Teacher())
    exp = experiment.setup_experiment("nb", "cpu", str(tmp_path / "data"), str(tmp_path), pair="vgg13-mv2")
    assert exp.cfg == pairs.pair_config("cpu", "vgg13-mv2", data_dir=str(tmp_path / "data"), out_dir=str(tmp_path))
    assert (trained[0].model, trained[0].width) == pairs.PAIRS["cpu"]["vgg13-mv2"].teacher
    assert exp.figures == str(tmp_path / "figures" / "nb-vgg13-mv2")
    own = experiment.setup_experiment("nb", "cpu", str(tmp_path / "data"), str(tmp_path))
    assert own.figures == str(tmp_path / "figures" / "nb") and own.cfg.model == PROFILES["cpu"]["model"]
    with pytest.raises(UnknownNameError, match="profiles with pairs"):
        experiment.setup_experiment("nb", "smoke", out_dir=str(tmp_path), pair="vgg13-mv2")
