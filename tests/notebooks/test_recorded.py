"""Recorded notebooks: nbval holds what the notebooks print on a fixed fixture to what was recorded.

tests/notebooks/recorded/ holds copies of notebooks/ executed on the fixture of tests/notebooks/fixture.py, with
their outputs (`python -m tests.notebooks.record` writes them); notebooks/ itself stays output-free.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from tests.notebooks.conftest import NOTEBOOKS as SOURCES
from tests.notebooks.fixture import NOTEBOOKS, RECORDED, SANITIZE

RERECORD = "re-record with `python -m tests.notebooks.record {name}` and review the diff"


def _injected(nb) -> int:
    (i,) = [i for i, c in enumerate(nb.cells) if "injected-parameters" in c.metadata.get("tags", [])]
    return i


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_recorded_copy_is_the_notebook_with_fixed_parameters(name):
    """Same cells as notebooks/NAME plus papermill's parameter cell; outputs, and no errors, in every cell."""
    rec, src = nbformat.read(RECORDED / name, as_version=4), nbformat.read(SOURCES / name, as_version=4)
    i = _injected(rec)
    cells = rec.cells[:i] + rec.cells[i + 1:]
    assert [(c.cell_type, c.source) for c in cells] == [(c.cell_type, c.source) for c in src.cells], \
        f"notebooks/{name} changed since it was recorded: " + RERECORD.format(name=name)
    namespace: dict = {}
    exec(rec.cells[i].source, namespace)  # noqa: S102 (our own recorded file)
    namespace.pop("__builtins__")
    assert namespace == NOTEBOOKS[name], "the fixed parameters changed: " + RERECORD.format(name=name)
    outputs = [o for c in rec.cells if c.cell_type == "code" for o in c.outputs]
    assert len(outputs) >= 5 and not [o for o in outputs if o.output_type == "error"]


def _nbval(paths: list[Path], cwd: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "--nbval", "-q", "-p", "no:cacheprovider", "--rootdir",
                           str(cwd), "--nbval-sanitize-with", str(cwd / SANITIZE.name), "--nbval-cell-timeout", "240",
                           *extra, *map(str, paths)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_nbval_holds_the_notebooks_to_their_recorded_outputs(recorded_stack, tmp_path):
    copy = tmp_path / "recorded"
    shutil.copytree(RECORDED, copy)
    proc = _nbval([copy], copy, recorded_stack.env)
    assert proc.returncode == 0, f"{RERECORD.format(name='')} if the change is intended:\n{proc.stdout[-8000:]}"
    cells = sum(c.cell_type == "code" for n in NOTEBOOKS for c in nbformat.read(copy / n, as_version=4).cells)
    assert f"{cells} passed" in proc.stdout, proc.stdout[-3000:]


def test_nbval_catches_a_changed_output(recorded_stack, tmp_path):
    """A recorded summary line with one number changed, as a regression in loading would change it, fails."""
    name = "03_gpu_telemetry_exploration.ipynb"
    nb = nbformat.read(RECORDED / name, as_version=4)
    recorded = changed = ""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and (m := re.search(r"reported ([\d,]+) samples", out.text)):
                recorded, changed = m[1], f"{int(m[1].replace(',', '')) + 1:,}"
                out.text = out.text.replace(m[0], f"reported {changed} samples")
                break
        if changed:
            break
    assert changed, f"no 'reported N samples' line in the recorded {name}"
    shutil.copy(SANITIZE, tmp_path / SANITIZE.name)
    nbformat.write(nb, tmp_path / name)
    proc = _nbval([tmp_path / name], tmp_path, recorded_stack.env, "-x")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "1 failed" in out and "Cell outputs differ" in out and "mismatch 'stdout'" in out, out[-4000:]
    assert f"orted {recorded} samples" in out and f"orted {changed} samples" in out, out[-4000:]  # the diff shows both
