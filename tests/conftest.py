"""Shared fixtures: generated datasets in the official layouts, the real CIFAR-10 copy if present."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A subprocess or notebook cell that runs past this has hung: it is a guard, not a timing check, and sits far
# above the slowest case on a 2-core machine shared with a training job (bench --quick passed 300 s there).
HANG_SECONDS = 1800
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KD_PROGRESS", "0")  # no progress bars in test logs
# ``run.sh test`` runs one pytest worker per core (pytest-xdist): each at one thread, or two
# 2-thread workers on 2 cores would wait on each other's threads (3-15x slower); subprocesses inherit it
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"

import data_utils  # noqa: E402
from train_eval import make_config  # noqa: E402

if WORKER:
    import torch

    torch.set_num_threads(1)

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> str:
    """A data folder holding small generated CIFAR-10 and CIFAR-100 sets (1,000 training images
    each once the smoke profile's 200 validation images are held out)."""
    root = tmp_path_factory.mktemp("data")
    data_utils.write_synthetic_cifar(str(root), "cifar10", n_train=1200, n_test=200, seed=0)
    data_utils.write_synthetic_cifar(str(root), "cifar100", n_train=1200, n_test=200, seed=1)
    return str(root)


@pytest.fixture
def smoke_cfg(synthetic_dir, tmp_path):
    """The smoke profile on the generated data, writing runs under tmp_path."""

    def make(**overrides):
        overrides = {"out_dir": str(tmp_path / "runs"), **overrides}
        return make_config("smoke", data_dir=synthetic_dir, **overrides)

    return make


@pytest.fixture(scope="session")
def smoke_teacher(synthetic_dir, tmp_path_factory):
    """The smoke profile's teacher, trained once for the session."""
    from train_eval import train
    from train_kd import teacher_config

    cfg = make_config("smoke", data_dir=synthetic_dir, out_dir=str(tmp_path_factory.mktemp("runs")))
    return train(teacher_config(cfg))


@pytest.fixture(scope="session")
def real_cifar10() -> str:
    """Folder holding the real CIFAR-10 (prepared from ../shared/data if needed); skips if absent."""
    data_dir = Path(os.environ.get("CIFAR_DATA_DIR", ROOT / "data"))
    if (data_dir / "cifar-10-batches-py" / "test_batch").is_file():
        return str(data_dir)
    script = SHARED_DATA / "prepare_cifar10.py"
    if not (script.is_file() and (SHARED_DATA / "cifar10-jpeg.zip").is_file()):
        pytest.skip(f"real CIFAR-10 not found in {data_dir} and no copy at {SHARED_DATA}")
    subprocess.run([sys.executable, str(script), str(data_dir)], check=True)
    return str(data_dir)


# ----------------------------------------------------------------------------- shared checks of whole runs


def assert_same_run(a, b):
    """Two results of one run config are the same to the bit: folder name, metrics (timing aside),
    weights, the loss's own state (adapters, memory banks) and the RNG state."""
    import pandas as pd
    import torch

    from checkpoints import read_checkpoint
    from train_eval import TIMING_COLUMNS

    assert a.run_dir.split("/")[-1] == b.run_dir.split("/")[-1]
    pd.testing.assert_frame_equal(a.history.drop(columns=TIMING_COLUMNS), b.history.drop(columns=TIMING_COLUMNS))
    sa, sb = read_checkpoint(a.run_dir), read_checkpoint(b.run_dir)
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    assert sa["train_state"]["task"].keys() == sb["train_state"]["task"].keys()
    for key, value in sa["train_state"]["task"].items():
        assert torch.equal(value, sb["train_state"]["task"][key]), key
    assert torch.equal(sa["train_state"]["rng"], sb["train_state"]["rng"])


class Interrupt(Exception):
    """Stands for a kill right after an epoch's checkpoint."""


def interrupted_then_resumed(cfg, monkeypatch, after_epoch: int = 0):
    """Run ``cfg`` (``distiller.distill``), interrupted right after epoch ``after_epoch``'s checkpoint
    (0-based), then run it again: the resumed result."""
    from functools import partial

    import train_eval
    from distiller import distill

    def interrupt(epoch, row):
        if epoch == after_epoch:
            raise Interrupt

    with monkeypatch.context() as m:
        m.setattr(train_eval, "fit", partial(train_eval.fit, callbacks=(interrupt,)))
        with pytest.raises(Interrupt):
            distill(cfg)
    return distill(cfg)


# The longest tests (the notebooks in smoke, a minute or two each) start first: started last, one of them
# would leave the other worker idle at the end of the run (with ``--dist worksteal`` the rest balances).
LONG_FIRST = ("test_notebooks.py::test_notebook_runs_in_smoke_profile",)


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: not any(key in item.nodeid for key in LONG_FIRST))  # stable: else in order
