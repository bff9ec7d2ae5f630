"""Notebook 04 (GPU accounting) with papermill against the live stack, and its refusal of bad parameters."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import httpx
import pandas as pd
import pytest
from papermill.exceptions import PapermillExecutionError

from tests.notebooks.conftest import NOTEBOOKS, run_notebook

NB = "04_gpu_accounting.ipynb"


def test_stored_form_and_parameters():
    import papermill as pm

    proc = subprocess.run([sys.executable, "-m", "nbstripout", "--verify", str(NOTEBOOKS / NB)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    declared = set(pm.inspect_notebook(str(NOTEBOOKS / NB)))
    assert {"api_url", "start_time", "end_time", "window", "group_by", "idle_threshold", "report_path"} <= declared


def test_accounting_report_of_the_live_window(stack, tmp_path):
    report = tmp_path / "usage"
    run_notebook(NB, tmp_path, api_url=stack.api_url, window="1h", report_path=str(report))
    totals = json.loads(report.with_suffix(".json").read_text())
    table = pd.read_csv(report.with_suffix(".csv"))
    api = httpx.get(f"{stack.api_url}/api/v1/usage", params={"start_time": totals["start_time"],
                                                             "end_time": totals["end_time"]}, timeout=60).json()
    assert {i["group"] or "(unattributed)": i["gpus"] for i in api["items"]} == dict(zip(table["group"],
                                                                                         table["gpus"], strict=True))
    history = pd.read_csv(stack.history_csv, usecols=["uuid", "namespace"], keep_default_na=False)
    owned = history[history["namespace"] != ""]["uuid"].nunique()
    assert int(table.loc[table["group"] == "ml-training", "gpus"].iloc[0]) == owned
    assert 0 < totals["unattributed_share"] < 1
    assert math.isclose(totals["gpu_hours"], table["gpu_hours"].sum(), rel_tol=1e-9)
    assert totals["top_wasting_pods"] is not None


def test_accounting_report_of_the_real_export_is_all_unattributed(stack, tmp_path):
    report = tmp_path / "real"
    run_notebook(NB, tmp_path, api_url=stack.api_url, start_time="2025-07-18T20:00:00Z",
                 end_time="2025-07-18T21:00:00Z", report_path=str(report))
    totals = json.loads(report.with_suffix(".json").read_text())
    table = pd.read_csv(report.with_suffix(".csv"))
    assert totals["unattributed_share"] == 1.0
    assert list(table["group"]) == ["(unattributed)"] and list(table["gpus"]) == [247]


@pytest.mark.parametrize("params, name", [({"group_by": "team"}, "group_by"),
                                          ({"start_time": "2025-07-18T21:00:00Z",
                                            "end_time": "2025-07-18T20:00:00Z"}, "end_time")])
def test_bad_parameters_fail_the_run_naming_them(stack, tmp_path, params, name):
    with pytest.raises(PapermillExecutionError) as err:
        run_notebook(NB, tmp_path, api_url=stack.api_url, report_path=str(tmp_path / "r"), **params)
    assert f"{name}: " in str(err.value)
