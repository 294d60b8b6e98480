"""run_notebooks: executes notebooks in order in their folder, never rewrites them, names failures."""

import nbformat
import pytest

from vprlib.run_notebooks import NotebookError, find_notebooks, main, run_notebook


def _write(path, *sources):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# t")]
    nb.cells += [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)
    return path.read_bytes()


def test_runs_in_order_in_notebook_folder_and_keeps_files(tmp_path, capsys):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    first = _write(nbs / "01_a.ipynb", "from pathlib import Path\nPath('a.txt').write_text('1')")
    second = _write(
        nbs / "02_b.ipynb", "from pathlib import Path\nprint(Path('a.txt').read_text() + '2')"
    )
    assert [p.name for p in find_notebooks(nbs)] == ["01_a.ipynb", "02_b.ipynb"]
    assert main([str(nbs), "--out", str(tmp_path / "executed")]) == 0
    assert (nbs / "a.txt").read_text() == "1"  # cwd was the notebook folder
    assert (nbs / "01_a.ipynb").read_bytes() == first  # committed files untouched
    assert (nbs / "02_b.ipynb").read_bytes() == second
    executed = nbformat.read(tmp_path / "executed" / "02_b.ipynb", as_version=4)
    assert executed.cells[1].outputs[0]["text"] == "12\n"
    assert "2 notebook(s) ran" in capsys.readouterr().out


def test_failure_names_notebook_and_cell(tmp_path, capsys):
    _write(tmp_path / "01_bad.ipynb", "x = 1", "raise ValueError('boom here')", "y = 2")
    with pytest.raises(NotebookError, match=r"01_bad.ipynb: cell 2 failed(.|\n)*boom here"):
        run_notebook(tmp_path / "01_bad.ipynb", timeout=60)
    assert main([str(tmp_path)]) == 1
    assert "FAILED 01_bad.ipynb: cell 2" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .ipynb"):
        find_notebooks(empty)


def test_a_dying_kernel_names_notebook_and_cell(tmp_path, capsys):
    _write(tmp_path / "01_dies.ipynb", "x = 1", "import os\nos._exit(1)")
    with pytest.raises(NotebookError, match=r"01_dies.ipynb: cell 2 failed"):
        run_notebook(tmp_path / "01_dies.ipynb", timeout=60)
    assert main([str(tmp_path)]) == 1
    assert "FAILED 01_dies.ipynb: cell 2" in capsys.readouterr().err


@pytest.mark.slow
def test_retrieval_notebook_runs_alone_without_notebook_02s_checkpoint(
    repo_root, tmp_path, monkeypatch
):
    """A fresh Colab runtime or a single notebook run: 04 trains the tiny model itself when
    the checkpoint notebook 02 writes (../checkpoints/02_convap/last.ckpt) is missing."""
    import shutil

    folder = tmp_path / "notebooks"
    folder.mkdir()
    notebook = shutil.copy(repo_root / "notebooks" / "04_retrieval_results.ipynb", folder)
    monkeypatch.setenv("VPRLIB_DATA", str(repo_root / "data" / "sample"))
    monkeypatch.setenv("VPRLIB_FIGURES", str(tmp_path / "figures"))
    monkeypatch.delenv("VPRLIB_WEIGHTS", raising=False)
    run_notebook(notebook, timeout=600)
    trained = tmp_path / "checkpoints" / "02_convap"
    assert (trained / "last.ckpt").is_file() and (trained / "history.csv").is_file()
