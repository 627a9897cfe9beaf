"""The main job: the quickstart runner (notebook headless, or the plain script)."""

import nbformat

from hydra_nb import quickstart


def test_script_mode_prints_the_table_and_saves_a_figure(tmp_path, capsys):
    assert quickstart.main(["--script", "--epochs", "1", "--n-test", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("most helpful") == 2 and "test digit #" in out
    assert (tmp_path / "quickstart.png").stat().st_size > 10_000
    assert (tmp_path / "digits.zarr" / "zarr.json").exists()


def test_run_notebook_writes_executed_notebook_and_html_and_echoes_prints(tmp_path, capsys):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import hydra_nb, os\nprint('cwd is', os.path.basename(os.getcwd()))")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nb, path)
    out_dir = tmp_path / "out"
    executed = quickstart.run_notebook(path, out_dir)
    assert "cwd is out" in capsys.readouterr().out  # the notebook ran in the output folder, in this Python
    done = nbformat.read(executed, as_version=4)
    assert done.cells[0].outputs[0]["text"].startswith("cwd is out")
    assert "cwd is out" in (out_dir / "tiny.html").read_text()


def test_the_readme_runs_the_quickstart_notebook():
    assert quickstart.NOTEBOOK.exists()
    nb = nbformat.read(quickstart.NOTEBOOK, as_version=4)
    source = "\n".join(c.source for c in nb.cells)
    assert "%%hydra_track" in source and "top_k" in source and "hydra_nb.explore" in source
    assert 'mode="exact", exact_indices=candidates' in source  # the fast ranking is checked against exact mode
