"""Run the workbook notebooks headless, in order: `python -m vprlib.run_notebooks notebooks`.

Each notebook runs in a fresh kernel with the notebooks folder as working directory (the
notebooks use paths like ../data/sample and ../figures). The committed .ipynb files are never
modified; `--out DIR` writes the executed copies there instead. On the first failing cell the
run stops and names the notebook, the cell number and the start of its source. Used by
`make notebooks`. Needs nbclient, nbformat and ipykernel (the `dev` extra).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .fileio import atomic_write_text
from .optional import needs


class NotebookError(RuntimeError):
    """A cell of a notebook failed; the message names the notebook and the cell."""


def find_notebooks(folder: str | os.PathLike) -> list[Path]:
    """The workbook notebooks of `folder` in run order (by file name: 01_..., 02_...)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"notebook folder not found: {folder}")
    found = sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith("."))
    if not found:
        raise FileNotFoundError(f"no .ipynb files in {folder}")
    return found


def run_notebook(
    path: str | os.PathLike,
    timeout: int = 600,
    out_dir: str | os.PathLike | None = None,
    kernel_name: str = "python3",
) -> float:
    """Execute every code cell of one notebook; returns seconds taken.

    Raises NotebookError naming the notebook and cell when a cell fails or times out.
    """
    with needs("vprlib.run_notebooks", "nbformat", "nbclient", extra="dev"):
        import nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel_name,
        resources={"metadata": {"path": str(path.parent.resolve())}},
    )
    start = time.perf_counter()
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            try:
                client.execute_cell(cell, index)
            except (CellExecutionError, CellTimeoutError, DeadKernelError) as err:
                head = "\n".join(cell.source.splitlines()[:3])
                raise NotebookError(
                    f"{path.name}: cell {index} failed:\n--- cell source ---\n{head}\n"
                    f"--- error ---\n{err}"
                ) from err
    seconds = time.perf_counter() - start
    if out_dir is not None:
        atomic_write_text(Path(out_dir) / path.name, nbformat.writes(nb))
    return seconds


def main(argv: list[str] | None = None) -> int:
    """Command line: run all notebooks of a folder in order and print each one's time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="folder holding the notebooks (e.g. notebooks)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    parser.add_argument("--out", default=None, help="write executed copies to this folder")
    parser.add_argument("--only", nargs="*", default=None, help="run only these file names")
    args = parser.parse_args(argv)

    notebooks = find_notebooks(args.folder)
    if args.only:
        names = {p.name for p in notebooks}
        unknown = sorted(set(args.only) - names)
        if unknown:
            parser.error(f"--only: not in {args.folder}: {unknown}; have {sorted(names)}")
        notebooks = [p for p in notebooks if p.name in args.only]
    total = 0.0
    for nb_path in notebooks:
        print(f"running {nb_path.name} ...", flush=True)
        try:
            seconds = run_notebook(nb_path, timeout=args.timeout, out_dir=args.out)
        except NotebookError as err:
            print(f"FAILED {err}", file=sys.stderr, flush=True)
            return 1
        total += seconds
        print(f"  ok in {seconds:.1f} s", flush=True)
    print(f"{len(notebooks)} notebook(s) ran in {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
