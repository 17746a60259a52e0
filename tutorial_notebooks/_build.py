"""Build the tutorial notebooks from their percent-format sources in ``src/`` and (optionally) execute them.

    python tutorial_notebooks/_build.py                 # src/*.py -> *.ipynb, no outputs
    python tutorial_notebooks/_build.py --execute       # ... and run them in full mode, storing outputs
    python tutorial_notebooks/_build.py --execute --fast 03   # one notebook, fast mode (FLAXDIFF_TUTORIAL_FAST=1)

A source is plain Python; ``# %% [markdown]`` starts a Markdown cell (its lines are ``# ``-prefixed comments) and
``# %%`` a code cell. Notebooks run with the Jupyter kernel ``python3`` of the interpreter running this script,
one at a time, from this directory.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent
FAST_ENV = "FLAXDIFF_TUTORIAL_FAST"


def parse_cells(text: str) -> list[nbformat.NotebookNode]:
    """Split a percent-format script into Markdown and code cells."""
    cells: list[nbformat.NotebookNode] = []
    kind, lines = None, []

    def flush() -> None:
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(body))
        elif kind == "code" and body.strip():
            cells.append(nbformat.v4.new_code_cell(body))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def build(source: pathlib.Path) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = parse_cells(source.read_text())
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    return notebook


def execute(notebook: nbformat.NotebookNode, fast: bool, timeout: int = 1200) -> nbformat.NotebookNode:
    """Run every cell top to bottom in this interpreter's ``python3`` kernel; raises on the first error."""
    previous = os.environ.get(FAST_ENV)
    os.environ[FAST_ENV] = "1" if fast else "0"
    try:
        client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(HERE)}})
        client.execute()
    finally:
        if previous is None:
            os.environ.pop(FAST_ENV, None)
        else:
            os.environ[FAST_ENV] = previous
    return notebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("only", nargs="*", help="notebook name prefixes to build (default: all)")
    parser.add_argument("--execute", action="store_true", help="execute and store outputs")
    parser.add_argument("--fast", action="store_true", help=f"execute with {FAST_ENV}=1")
    args = parser.parse_args()
    for source in sorted((HERE / "src").glob("*.py")):
        if args.only and not any(source.stem.startswith(prefix) for prefix in args.only):
            continue
        notebook = build(source)
        if args.execute:
            start = time.time()
            execute(notebook, args.fast)
            print(f"{source.stem}: executed in {time.time() - start:.0f} s", file=sys.stderr)
        target = HERE / f"{source.stem}.ipynb"
        nbformat.write(notebook, target)
        print(f"wrote {target.name} ({target.stat().st_size / 1024:.0f} KiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
