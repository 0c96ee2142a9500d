"""Faults a shared results folder can hold: a planted lock link, a read-only mount, stray temporaries."""

import errno
import os

import pytest

import runs
from atomic_files import remove_stale_temporaries
from train_eval import run_dir_for, train


def test_a_lock_that_is_a_symbolic_link_is_refused_and_its_target_kept(smoke_cfg, tmp_path):
    cfg = smoke_cfg(epochs=1)
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    run_dir = run_dir_for(cfg)
    os.makedirs(run_dir)
    os.symlink(precious, os.path.join(run_dir, ".lock"))
    with pytest.raises(ValueError, match="symbolic link"):
        train(cfg)
    assert precious.read_text() == "keep me"


def test_a_finished_run_on_a_read_only_mount_is_still_reused(smoke_cfg, monkeypatch):
    cfg = smoke_cfg(epochs=1)
    first = train(cfg)
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(runs.os, "open", read_only)
    again = train(cfg)
    assert again.run_dir == first.run_dir and again.history.equals(first.history)
    with pytest.raises(ValueError, match="not writable and holds no finished run"):
        train(smoke_cfg(epochs=2))


def test_only_the_projects_own_temporaries_are_cleaned_up(tmp_path):
    (tmp_path / ".tmp-abc.pt").write_text("stale")
    (tmp_path / "notes.tmp-keep.txt").write_text("a user's file")
    remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["notes.tmp-keep.txt"]
