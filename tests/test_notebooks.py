"""Every task notebook runs top to bottom in the smoke profile (generated data, tiny models)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import HANG_SECONDS, ROOT

NOTEBOOKS = sorted(p.name for p in ROOT.glob("*.ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_smoke_profile(name, tmp_path, monkeypatch):
    monkeypatch.setenv("KD_PROFILE", "smoke")
    monkeypatch.setenv("KD_OUT_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("KD_PROGRESS", "0")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(ROOT / name, as_version=4)
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), "needs a papermill parameters cell"
    NotebookClient(
        nb, timeout=HANG_SECONDS, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert any(Path(tmp_path / "runs" / "figures").rglob("*.png")), "figures are saved as well as shown"
    assert os.listdir(tmp_path / "runs")
