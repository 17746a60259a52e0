"""The tutorial notebooks: in sync with their sources, committed with figures, and executable top to bottom.

Every notebook runs in its fast mode (FLAXDIFF_TUTORIAL_FAST=1: tiny models and step counts) in a fresh
``python3`` Jupyter kernel of this interpreter; any cell error fails the test with the cell's traceback. Fast mode
is dominated by XLA compilation, so the kernel runs with XLA's CPU backend optimisation turned down and the classic
emitters (as in tests/conftest.py; the numbers the notebooks compute do not matter here).
"""
import importlib.util
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "tutorial_notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT = 600
FAST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                  "--xla_cpu_use_fusion_emitters=false")


def _builder():
    spec = importlib.util.spec_from_file_location("tutorial_build", NOTEBOOK_DIR / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_source_has_its_notebook():
    sources = sorted(path.stem for path in (NOTEBOOK_DIR / "src").glob("*.py"))
    assert len(sources) == 7
    assert [path.stem for path in NOTEBOOKS] == sources


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_matches_source_and_shows_figures(path):
    notebook = nbformat.read(path, as_version=4)
    built = _builder().build(NOTEBOOK_DIR / "src" / f"{path.stem}.py")
    assert [(c.cell_type, c.source) for c in notebook.cells] == [(c.cell_type, c.source) for c in built.cells], \
        f"{path.name} is out of date: run python tutorial_notebooks/_build.py --execute {path.stem[:2]}"
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert figures, f"{path.name} has no figure; commit it with outputs from a full run"
    assert "mode: full" in "".join(o.get("text", "") for o in outputs), f"{path.name} outputs are not a full run"
    assert path.stat().st_size < 1_000_000


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_in_fast_mode(path, monkeypatch):
    monkeypatch.setenv("FLAXDIFF_TUTORIAL_FAST", "1")
    monkeypatch.setenv("XLA_FLAGS", FAST_XLA_FLAGS)
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "mode: FAST" in text
    figures = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs
               if "image/png" in o.get("data", {})]
    assert figures
