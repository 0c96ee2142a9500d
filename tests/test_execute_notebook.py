"""execute_notebook.py: a notebook executes in a profile, its outputs are kept when a cell fails, and
prose edited during an execution is merged only onto the same code."""

import nbformat
import pytest

from execute_notebook import main, notebook_env, with_prose


def _notebook(path, *cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# title")]
    nb.cells += [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)
    return path


def _outputs(path):
    nb = nbformat.read(path, as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def test_executes_in_the_profile_and_writes_the_outputs(tmp_path):
    src = _notebook(tmp_path / "a.ipynb", "import os\nprint(os.environ['KD_PROFILE'], 6 * 7)")
    assert main([str(src), "--profile", "smoke", "--out", str(tmp_path / "out.ipynb")]) == 0
    assert _outputs(tmp_path / "out.ipynb")[0]["text"] == "smoke 42\n"
    assert _outputs(src) == []  # --out leaves the source as it was


def test_a_failing_cell_keeps_the_outputs_before_it(tmp_path):
    src = _notebook(tmp_path / "a.ipynb", "print('done')", "1 / 0", "print('never')")
    assert main([str(src), "--profile", "smoke"]) == 1
    outs = _outputs(src)
    assert outs[0]["text"] == "done\n"
    assert outs[1]["output_type"] == "error" and outs[1]["ename"] == "ZeroDivisionError"
    assert len(outs) == 2


def test_each_cell_is_timed_and_the_notebook_so_far_written_after_it(tmp_path, capsys):
    read_back = (
        "import nbformat\n"
        f"nb = nbformat.read({str(tmp_path / 'out.partial.ipynb')!r}, as_version=4)\n"
        "print('seen:', nb.cells[1].outputs[0]['text'].strip())"
    )
    src = _notebook(tmp_path / "a.ipynb", "import time\ntime.sleep(1.6)\nprint('first')", read_back)
    assert main([str(src), "--profile", "smoke", "--out", str(tmp_path / "out.ipynb")]) == 0
    assert _outputs(tmp_path / "out.ipynb")[1]["text"] == "seen: first\n"  # written before cell 2 ran
    assert not (tmp_path / "out.partial.ipynb").exists()
    assert "cell 1: 2 s" in capsys.readouterr().err  # the cell's run time, not the time to send it


def test_prose_is_merged_onto_identical_code_only(tmp_path):
    executed = nbformat.read(_notebook(tmp_path / "a.ipynb", "x = 1"), as_version=4)
    executed.cells[1].outputs = [nbformat.v4.new_output("stream", text="ran\n")]
    edited = nbformat.read(_notebook(tmp_path / "b.ipynb", "x = 1"), as_version=4)
    edited.cells[0].source = "# title\n\nThe discussion, written meanwhile."
    merged = with_prose(executed, edited)
    assert merged.cells[0].source.endswith("written meanwhile.")
    assert merged.cells[1].outputs[0]["text"] == "ran\n"
    edited.cells[1].source = "x = 2"
    with pytest.raises(ValueError, match="code cells \\[0\\]"):
        with_prose(executed, edited)


def test_unknown_profile_and_missing_notebook_say_what_is_valid(tmp_path):
    with pytest.raises(ValueError, match="valid: smoke, cpu, paper"):
        notebook_env("gpu")
    with pytest.raises(SystemExit, match="Logit_Matching.ipynb"):
        main([str(tmp_path / "nope.ipynb")])


def test_outputs_from_an_executed_copy_onto_the_edited_one(tmp_path):
    ran = _notebook(tmp_path / "ran.ipynb", "print(6 * 7)")
    assert main([str(ran), "--profile", "smoke"]) == 0
    edited = nbformat.read(_notebook(tmp_path / "edited.ipynb", "print(6 * 7)"), as_version=4)
    edited.cells[0].source = "# title\n\nThe answer is 42."
    nbformat.write(edited, tmp_path / "edited.ipynb")
    assert main([str(tmp_path / "edited.ipynb"), "--outputs-from", str(ran), "--out", str(tmp_path / "x.ipynb")]) == 0
    merged = nbformat.read(tmp_path / "x.ipynb", as_version=4)
    assert merged.cells[0].source.endswith("The answer is 42.")
    assert merged.cells[1].outputs[0]["text"] == "42\n"
