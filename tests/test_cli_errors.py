"""Every bad value of every option is a usage error: exit 2, one error line naming the option and the
value, and nothing written. All in-process and before any data is read or any run starts."""

import os

import pytest
import torch

import multi_student
import train_eval
import train_kd
from checkpoints import save_checkpoint
from config import make_config
from model import create_model
from sweeps import RunsFailed

LONG = "x" * 300
MAINS = {"train_kd": train_kd.main, "train_eval": train_eval.main, "multi_student": multi_student.main}

# (command, arguments, the option the error line must name, the value it must name)
CASES = [
    # the sweep options of train_kd.py
    ("train_kd", ["--jobs", "a", "--seeds", "0"], "--jobs", "a"),
    ("train_kd", ["--jobs", "0", "--seeds", "0"], "--jobs", "0"),
    ("train_kd", ["--jobs", "-2", "--seeds", "0"], "--jobs", "-2"),
    ("train_kd", ["--jobs", "1.5"], "--jobs", "1.5"),
    ("train_kd", ["--seeds", "a"], "--seeds", "a"),
    ("train_kd", ["--seeds", "5-1"], "--seeds", "5-1"),
    ("train_kd", ["--seeds", "1-"], "--seeds", "1-"),
    ("train_kd", ["--seeds", "-1"], "--seeds", "-1"),
    ("train_kd", ["--seeds", "0,,2"], "--seeds", "0,,2"),
    ("train_kd", ["--seeds", ""], "--seeds", "''"),
    ("train_kd", ["--seeds", "0,0"], "--seeds", "0,0"),
    ("train_kd", ["--seeds", "0-2-4"], "--seeds", "0-2-4"),
    ("train_kd", ["--sweep", "T=1,,2"], "--sweep", "T=1,,2"),
    ("train_kd", ["--sweep", "T=a"], "--sweep", "T=a"),
    ("train_kd", ["--sweep", "T"], "--sweep", "'T'"),
    ("train_kd", ["--sweep", "T="], "--sweep", "T="),
    ("train_kd", ["--sweep", "tau=1,2"], "--sweep", "tau"),
    ("train_kd", ["--sweep", "T=-1"], "--sweep", "-1"),
    ("train_kd", ["--sweep", "T=1,1"], "--sweep", "T=1,1"),
    ("train_kd", ["--sweep", "T=1", "T=2"], "--sweep", "T=2"),
    ("train_kd", ["--sweep", "seed=1,2"], "--sweep", "seed=1,2"),
    ("train_kd", ["--sweep", "flip=maybe"], "--sweep", "maybe"),
    ("train_kd", ["--sweep", "epochs=1.5"], "--sweep", "1.5"),
    ("train_kd", ["--sweep", "milestones=1,2"], "--sweep", "milestones"),
    ("train_kd", ["--sweep", "name=a,b"], "--sweep", "name=a,b"),
    ("train_kd", ["--sweep", "T=2,4", "--name", "mine"], "--name", "mine"),
    ("train_kd", ["--sweep", "T=2,4", "--prune", "x"], "--prune", "x"),
    ("train_kd", ["--sweep", "T=2,4", "--prune", "-1"], "--prune", "-1"),
    ("train_kd", ["--prune", "2"], "--prune", "--sweep"),
    ("train_kd", ["--stop-after", "-1"], "--stop-after", "-1"),
    # config values, on each command line
    ("train_kd", ["--profile", "x"], "--profile", "x"),
    ("train_kd", ["--method", "x"], "--method", "x"),
    ("train_kd", ["--dataset", "x"], "--dataset", "x"),
    ("train_kd", ["--lr", "nan"], "--lr", "nan"),
    ("train_kd", ["--lr", "-1"], "--lr", "-1"),
    ("train_kd", ["--epochs", "0"], "--epochs", "0"),
    ("train_kd", ["--epochs", "a"], "--epochs", "a"),
    ("train_kd", ["--width", "-1"], "--width", "-1"),
    ("train_kd", ["--T", "-1"], "--T", "-1"),
    ("train_kd", ["--kd-weight", "-1"], "--kd-weight", "-1"),
    ("train_kd", ["--momentum", "1.5"], "--momentum", "1.5"),
    ("train_kd", ["--val-size", "7"], "--val-size", "7"),
    ("train_kd", ["--batch-size", "0"], "--batch-size", "0"),
    ("train_kd", ["--threads", "-1"], "--threads", "-1"),
    ("train_kd", ["--budget", "-5"], "--budget", "-5"),
    ("train_kd", ["--weight-decay", "-1"], "--weight-decay", "-1"),
    ("train_kd", ["--n-seeds", "0"], "--n-seeds", "0"),
    ("train_kd", ["--name", LONG], "--name", LONG),
    ("train_kd", ["--name", "../elsewhere"], "--name", "../elsewhere"),
    ("train_kd", ["--name", ".hidden"], "--name", ".hidden"),
    ("train_kd", ["--out-dir", "{file}/runs"], "--out-dir", "{file}/runs"),
    ("train_kd", ["--out-dir", "{file}"], "--out-dir", "{file}"),
    ("train_kd", ["--data-dir", "{file}/data"], "--data-dir", "{file}/data"),
    ("train_eval", ["--method", "kd"], "--method", "kd"),
    ("train_eval", ["--epochs", "0"], "--epochs", "0"),
    ("train_eval", ["--lr", "inf"], "--lr", "inf"),
    ("train_eval", ["--optimizer", "x"], "--optimizer", "x"),
    ("train_eval", ["--name", LONG], "--name", LONG),
    ("train_eval", ["--out-dir", "{file}/runs"], "--out-dir", "{file}/runs"),
    ("train_eval", ["--name", "taken"], "--name", "taken"),  # holds another config's run
    ("multi_student", ["--group", "x"], "--group", "x"),
    ("multi_student", ["--members", "0"], "--members", "0"),
    ("multi_student", ["--head-epochs", "a"], "--head-epochs", "a"),
    ("multi_student", ["--group", "dml+kd"], "--group", "dml+kd"),
    ("multi_student", ["--group", "ensemble", "--members", "2", "--name", "mine"], "--name", "mine"),
    ("multi_student", ["--group", "specialists", "--teacher", "{file}", "--name", "mine"], "--name", "mine"),
    ("multi_student", ["--name", LONG], "--name", LONG),
    ("multi_student", ["--out-dir", "{file}/runs"], "--out-dir", "{file}/runs"),
]


@pytest.fixture
def workspace(tmp_path):
    """A folder holding a plain file and a run folder ``taken`` trained with another config."""
    (tmp_path / "afile").write_text("not a folder")
    out = tmp_path / "runs"
    other = make_config("smoke", out_dir=str(out), data_dir=str(tmp_path / "data"), name="taken", lr=0.2)
    torch.manual_seed(0)
    save_checkpoint(
        str(out / "taken" / "checkpoint.pt"), create_model("vgg8", num_classes=10, width=0.0625), config=other
    )
    return tmp_path


def _listing(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files}


@pytest.mark.parametrize("command, args, option, value", CASES, ids=[f"{c[0]} {' '.join(c[1])[:40]}" for c in CASES])
def test_a_bad_value_is_a_one_line_usage_error_naming_option_and_value(workspace, capsys, command, args, option, value):
    fill = {"file": str(workspace / "afile")}
    args = [a.format(**fill) for a in args]
    value = value.format(**fill)
    base = ["--profile", "smoke", "--data-dir", str(workspace / "data"), "--out-dir", str(workspace / "runs")]
    if command == "train_kd":
        base += ["--teacher", str(workspace / "no-teacher")]
    before = _listing(workspace)
    with pytest.raises(SystemExit) as exit_:
        MAINS[command]([*base, *args])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exit_.value.code == 2, err
    assert len(lines) == 2 and lines[0].startswith("usage:") and ": error: " in lines[1], err
    assert option in lines[1] and value in lines[1], lines[1]
    assert out == ""
    assert _listing(workspace) == before  # nothing created: no folder, no data, no teacher check


def test_a_failed_sweep_is_a_message_not_a_traceback(workspace, capsys, monkeypatch):
    def failing(cfg, grid, seeds, jobs, prune=None):
        err = RuntimeError("1 of 2 runs failed (the others finished; rerunning the sweep redoes only the missing ones)")
        err.results = None
        raise err

    monkeypatch.setattr(train_kd, "sweep", failing)
    base = ["--profile", "smoke", "--data-dir", str(workspace / "data"), "--out-dir", str(workspace / "runs")]
    with pytest.raises(SystemExit) as exit_:
        train_kd.main([*base, "--teacher", str(workspace / "t"), "--sweep", "T=2,4", "--seeds", "0", "--jobs", "1"])
    assert exit_.value.code == 2 and "error: 1 of 2 runs failed" in capsys.readouterr().err


def test_failed_ensemble_members_are_a_message_not_a_traceback(workspace, capsys, monkeypatch):
    def failing(*args, **kwargs):
        raise RunsFailed("1 of 2 runs failed (the others finished; rerun to redo only those)")

    monkeypatch.setattr(multi_student, "run_group", failing)
    base = ["--profile", "smoke", "--data-dir", str(workspace / "data"), "--out-dir", str(workspace / "runs")]
    with pytest.raises(SystemExit) as exit_:
        multi_student.main([*base, "--group", "ensemble", "--method", "ce", "--members", "2"])
    assert exit_.value.code == 2 and "error: 1 of 2 runs failed" in capsys.readouterr().err
