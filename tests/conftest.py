"""Shared fixtures: generated datasets in the official layouts, the real CIFAR-10 copy if present."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KD_PROGRESS", "0")  # no progress bars in test logs

import data_utils  # noqa: E402
from train_eval import make_config  # noqa: E402

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
