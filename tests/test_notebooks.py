"""Every task notebook runs top to bottom in the smoke profile (generated data, tiny models)."""

import os
from pathlib import Path

import nbformat
import pytest

from conftest import HANG_SECONDS, ROOT
from execute_notebook import execute, notebook_env

NOTEBOOKS = sorted(p.name for p in ROOT.glob("*.ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_smoke_profile(name, tmp_path, monkeypatch):
    monkeypatch.setenv("KD_PROGRESS", "0")
    nb = nbformat.read(ROOT / name, as_version=4)
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), "needs a papermill parameters cell"
    execute(nb, notebook_env("smoke", out_dir=str(tmp_path / "runs")), timeout=HANG_SECONDS)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert any(Path(tmp_path / "runs" / "figures").rglob("*.png")), "figures are saved as well as shown"
    assert os.listdir(tmp_path / "runs")
