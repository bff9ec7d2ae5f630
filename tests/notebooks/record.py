"""Re-record tests/notebooks/recorded/: run the notebooks on the fixed fixture and keep their outputs for nbval.

    python -m tests.notebooks.record            # every notebook in tests/notebooks/fixture.NOTEBOOKS
    python -m tests.notebooks.record 03_gpu_telemetry_exploration.ipynb

Run it after changing a notebook or what it prints, and review the diff: it is what nbval will hold the
notebooks to. Uses $REDIS_URL/$DATABASE_URL when both are set, else embedded servers in a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import nbformat

from tests.conftest import REAL_CSV, REPO, Servers
from tests.notebooks.fixture import NOTEBOOKS, RECORDED, fixture_stack, write_kernelspec

SOURCES = REPO / "notebooks"


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop what changes on every run and is not output: timings and papermill's run metadata.

    Execution counts stay (1, 2, 3, … on every run): nbval takes a cell without one for a cell never run.
    """
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    return nb


def record(names: list[str], servers: Servers, tmp: Path) -> list[Path]:
    """Execute `names` with papermill against a fixture stack on `servers`; write them to RECORDED."""
    import papermill as pm

    kernel_env = write_kernelspec(tmp / "jupyter")
    os.environ.update(kernel_env)
    written = []
    with fixture_stack(servers, tmp / "stack", kernel_env, REAL_CSV) as stack:
        saved = dict(os.environ)
        os.environ.update(stack.env)  # the notebooks' defaults come from the environment, as under nbval
        try:
            for name in names:
                run = tmp / "run" / name.removesuffix(".ipynb")
                run.mkdir(parents=True)
                nb = pm.execute_notebook(str(SOURCES / name), str(run / name), parameters=NOTEBOOKS[name],
                                         kernel_name="python3", cwd=str(run), progress_bar=False,
                                         execution_timeout=300)
                out = RECORDED / name
                nbformat.write(clean(nb), out)
                written.append(out)
                print(f"recorded {out.relative_to(REPO)}", flush=True)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.notebooks.record", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help=f"notebooks to record (default: {', '.join(NOTEBOOKS)})")
    args = parser.parse_args(argv)
    names = args.notebooks or list(NOTEBOOKS)
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        parser.error(f"not a recorded notebook: {', '.join(unknown)} (see tests/notebooks/fixture.py NOTEBOOKS)")
    if not REAL_CSV.is_file():
        parser.error(f"the real export is needed and was not found at {REAL_CSV}")
    from telemetry_nb.embedded import Embedded

    with tempfile.TemporaryDirectory(prefix="tnb-record-") as d:
        tmp = Path(d)
        redis_url, database_url = os.environ.get("REDIS_URL", ""), os.environ.get("DATABASE_URL", "")
        emb = None
        if not (redis_url and database_url):
            emb = Embedded(tmp / "embedded")
            env = emb.env()
            redis_url, database_url = env["REDIS_URL"], env["DATABASE_URL"]
        try:
            record(names, Servers(redis_url, database_url, None), tmp)
        finally:
            if emb is not None:
                emb.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
