"""The API's contract: schemathesis finds nothing against a live server with the real export and tokens on;
an empty database reads as empty; NUL and other invalid text is a 422 naming the parameter; bearer tokens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from telemetry_nb import store
from telemetry_nb.analysis import checks
from telemetry_nb.analysis.checks import FAIL, PASS
from telemetry_nb.analysis.client import APIError, TelemetryClient
from telemetry_nb.api.app import openapi_document
from telemetry_nb.api.auth import Tokens
from telemetry_nb.embedded import free_port
from tests.conftest import REPO, run_cli, start_cli, wait_http

TOKEN = "tnb-test-token-7f3a9c1e5b"
OTHER = "tnb-second-token-0d2e"


def _serve(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = start_cli("serve", "--port", str(port), env=env, log_path=log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/health")
    except AssertionError:
        proc.terminate()
        raise
    return proc, base


@pytest.fixture
def loaded_env(cli_env, real_csv) -> dict[str, str]:
    """cli_env over a database holding the real export."""
    run_cli("stream", "--csv", str(real_csv), env=cli_env)
    run_cli("collect", "--drain", env=cli_env)
    return cli_env


def test_schemathesis_finds_no_failure(loaded_env, tmp_path):
    """Every check schemathesis has (5xx, undocumented statuses, schema conformance, schema-valid requests
    rejected, invalid ones accepted, auth ignored…), fixed seed, against the live API with tokens on."""
    env = {**loaded_env, "TELEMETRY_API_TOKENS": f"{TOKEN},{OTHER}"}
    proc, base = _serve(env, tmp_path / "api.log")
    try:
        st_env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "TELEMETRY_API_URL": base,
                  "TELEMETRY_API_TOKEN": TOKEN, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json", "--checks", "all",
             "--seed", "20250718", "--max-examples", "100", "--workers", "2", "--no-shrink",
             "--header", f"Authorization: Bearer {TOKEN}", "--report", "junit",
             "--report-junit-path", str(tmp_path / "junit.xml")],
            cwd=tmp_path, env=st_env, capture_output=True, text=True, timeout=400)
        operations = sum(len(methods) for methods in httpx.get(f"{base}/openapi.json").json()["paths"].values())
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-12000:]
    assert "No issues found" in out and f"{operations} selected / {operations} total" in out, out[-3000:]
    assert "API Links:" in out  # the stateful phase followed list → GPU links into real GPUs
    assert TOKEN not in (tmp_path / "api.log").read_text()


def test_openapi_documents_401_and_the_bearer_scheme_only_when_tokens_are_on():
    open_doc, guarded = openapi_document(), openapi_document(tokens=Tokens(["x" * 16]))
    assert "securitySchemes" not in open_doc.get("components", {})
    for doc, has_401 in ((open_doc, False), (guarded, True)):
        for path, item in doc["paths"].items():
            responses = item["get"]["responses"]
            assert ("401" in responses) == (has_401 and path.startswith("/api/v1/")), path
            if path.startswith("/api/v1/"):
                assert "503" in responses and responses["200"]["content"]["application/json"]["schema"]["$ref"]
    telemetry = {p["name"]: p["schema"] for p in guarded["paths"]["/api/v1/gpus/{uuid}/telemetry"]["get"]["parameters"]}
    assert telemetry["start_time"]["format"] == "date-time" and telemetry["cursor"]["pattern"]
    assert telemetry["metric"]["items"]["pattern"] and "401" in guarded["paths"]["/api/v1/metrics"]["get"]["responses"]


# -- an empty database: no schema yet -----------------------------------------------------------------
def test_empty_database_reads_as_empty_and_ready_says_why(api_server):
    assert httpx.get(f"{api_server}/api/v1/gpus").json() == {"items": [], "next_cursor": None}
    assert httpx.get(f"{api_server}/api/v1/metrics").json() == {"items": []}
    for path in ("/api/v1/gpus/GPU-1", "/api/v1/gpus/GPU-1/telemetry", "/api/v1/gpus/GPU-1/telemetry/aggregate"):
        r = httpx.get(api_server + path)
        assert r.status_code == 404 and "GPU-1" in r.json()["detail"], (path, r.text)
    r = httpx.get(f"{api_server}/ready")
    assert r.status_code == 503
    body = r.json()
    assert body["failed"] == ["schema"] and "schema" in body["detail"] and body["checks"]["postgresql"] == "ok"
    assert "collector" in body["checks"]["schema"]


def test_ready_once_a_collector_created_the_schema(api_server, database_url):
    with store.connect(database_url, autocommit=True) as conn:
        store.migrate(conn)
    r = httpx.get(f"{api_server}/ready")
    assert r.status_code == 200 and r.json()["failed"] == [] and r.json()["status"] == "ready"


# -- invalid text ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, params, name", [
    ("/api/v1/gpus", {"hostname": "\x00"}, "hostname"),
    ("/api/v1/gpus", {"model_name": "H100\x00"}, "model_name"),
    ("/api/v1/gpus", {"cursor": "GPU-\x00"}, "cursor"),
    ("/api/v1/gpus", {"hostname": "host\x1b[31m"}, "hostname"),
    ("/api/v1/gpus/%00", {}, "uuid"),
    ("/api/v1/gpus/GPU-%00-1/telemetry", {}, "uuid"),
    ("/api/v1/gpus/GPU-1/telemetry", {"metric": "DCGM\x00"}, "metric"),
    ("/api/v1/gpus/GPU-1/telemetry", {"start_time": "2025-07-18T20:00:00Z\x00"}, "start_time"),
    ("/api/v1/gpus/GPU-1/telemetry", {"cursor": "\x00"}, "cursor"),
    ("/api/v1/gpus/GPU-1/telemetry/aggregate", {"bucket": "1m\x00"}, "bucket"),
    ("/api/v1/gpus/GPU-1/telemetry/aggregate", {"metric": ["DCGM_FI_DEV_GPU_UTIL", "\x01"]}, "metric"),
    ("/api/v1/gpus/GPU-1/telemetry", {"start_time": "2025-07-18T20:00:00"}, "start_time"),  # no offset
    ("/api/v1/gpus/GPU-1/telemetry", {"end_time": "1752871354"}, "end_time"),  # epoch: not RFC 3339
    ("/api/v1/gpus/GPU-1/telemetry", {"start_time": ""}, "start_time"),
    ("/api/v1/gpus/GPU-1/telemetry/aggregate", {"bucket": "0s"}, "bucket"),
])
def test_invalid_text_is_422_naming_the_parameter(api_server, path, params, name):
    r = httpx.get(api_server + path, params=params)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(name), r.json()


def test_times_out_of_range_clamp_instead_of_failing(api_server, database_url):
    with store.connect(database_url, autocommit=True) as conn:
        store.migrate(conn)
    r = httpx.get(f"{api_server}/api/v1/gpus/GPU-1/telemetry",
                  params={"start_time": "0001-01-01T00:00:00+05:00", "end_time": "9999-12-31T23:59:59-05:00"})
    assert r.status_code == 404  # parsed, clamped, and the GPU is unknown: no 5xx, no 422


def test_encoded_slash_cannot_reach_another_route(api_server):
    r = httpx.get(f"{api_server}/api/v1/gpus/GPU-1%2Ftelemetry")
    assert r.status_code == 404 and r.json()["detail"].startswith("Not Found")


# -- bearer tokens -----------------------------------------------------------------------------------
V1_ROUTES = ("/api/v1/gpus", "/api/v1/gpus/{uuid}", "/api/v1/gpus/{uuid}/telemetry",
             "/api/v1/gpus/{uuid}/telemetry/aggregate", "/api/v1/metrics")
OPEN_ROUTES = ("/health", "/ready", "/metrics", "/openapi.json")


def test_tokens_guard_every_v1_route_and_leave_service_routes_open(loaded_env, tmp_path):
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"# API tokens\n{TOKEN}\n{OTHER}\n")
    log_path = tmp_path / "api.log"
    proc, base = _serve({**loaded_env, "TELEMETRY_API_TOKENS_FILE": str(tokens_file)}, log_path)
    try:
        uuid = httpx.get(f"{base}/api/v1/gpus", headers={"Authorization": f"Bearer {TOKEN}"}).json()["items"][0]["uuid"]
        wrong = "tnb-wrong-token-5c5c"
        for route in V1_ROUTES:
            url = base + route.format(uuid=uuid)
            r = httpx.get(url)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (route, r.text)
            assert "Authorization: Bearer" in r.json()["detail"]
            for header in (f"Bearer {wrong}", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer", "Bearer é"):
                r = httpx.get(url, headers={"Authorization": header.encode()})
                assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), (route, header)
            for good in (TOKEN, OTHER):
                r = httpx.get(url, headers={"Authorization": f"bearer {good}"})
                assert r.status_code == 200, (route, r.text)
        for route in OPEN_ROUTES:
            assert httpx.get(base + route).status_code == 200, route
        doc = httpx.get(f"{base}/openapi.json").json()
        assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        assert all("401" in doc["paths"][route]["get"]["responses"] for route in V1_ROUTES)
        assert "401" not in doc["paths"]["/health"]["get"]["responses"]

        # rotation: the file is swapped (as a Kubernetes Secret update does); the old token stops working
        new = tmp_path / "tokens.new"
        new.write_text("tnb-rotated-token-99\n")
        os.replace(new, tokens_file)
        assert httpx.get(f"{base}/api/v1/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 401
        assert httpx.get(f"{base}/api/v1/metrics",
                         headers={"Authorization": "Bearer tnb-rotated-token-99"}).status_code == 200
        # the client passes its token (argument or $TELEMETRY_API_TOKEN), and never shows it
        with TelemetryClient(base, token="tnb-rotated-token-99") as client:
            assert client.metrics() and TOKEN not in repr(client) and "rotated" not in repr(client)
        with pytest.raises(APIError) as err, TelemetryClient(base, token=wrong) as client:
            client.gpus()
        assert err.value.status == 401 and wrong not in str(err.value)
        # the deployment checks and `telemetry-nb check` pass it too, and say what is wrong without it
        good = "tnb-rotated-token-99"
        r = {c.name: c for c in checks.check_api(base, token=good)}
        assert r["api.auth"].status == PASS and "token accepted" in r["api.auth"].detail
        r = {c.name: c for c in checks.check_api(base, token="")}
        assert r["api.auth"].status == FAIL and "requires a bearer token" in r["api.auth"].detail
        assert r["api.health"].status == PASS and r["api.ready"].status == PASS
        env = {k: v for k, v in loaded_env.items() if k != "TELEMETRY_API_TOKEN"}
        ok = run_cli("check", "--api-url", base, env={**env, "TELEMETRY_API_TOKEN": good})
        assert "api.auth   ok" in ok.stdout and good not in ok.stdout + ok.stderr
        refused = run_cli("check", "--api-url", base, "--api-token", wrong, env=env, check=False)
        assert refused.returncode == 1 and "api.auth   FAIL" in refused.stdout and "not accepted" in refused.stdout
        assert wrong not in refused.stdout + refused.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    log = log_path.read_text()
    assert "401 GET /api/v1/gpus" in log and "2 API token(s) from file" in log
    for secret in (TOKEN, OTHER, wrong, "tnb-rotated-token-99"):
        assert secret not in log


def test_token_file_is_reread_only_when_it_changes(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("alpha\n\n  beta  \n# comment\n")
    stats = []

    def stat(p: str) -> os.stat_result:
        stats.append(p)
        return os.stat(p)

    tokens = Tokens(path=path, stat=stat)
    assert tokens.accepts("alpha") and tokens.accepts("beta") and not tokens.accepts("gamma")
    assert not tokens.accepts("") and not tokens.accepts("# comment") and not tokens.accepts("alph")
    path.write_text("gamma-longer\n")
    assert tokens.accepts("gamma-longer") and not tokens.accepts("alpha")
    path.unlink()
    assert not tokens.accepts("gamma-longer")  # a missing file fails closed
    assert len(stats) >= 6
    assert Tokens.from_env({}) is None
    separators_only = Tokens.from_env({"TELEMETRY_API_TOKENS": " , "})
    assert separators_only is not None and not separators_only.accepts("") and not separators_only.accepts(",")
    assert Tokens.from_env({"TELEMETRY_API_TOKENS": "a, b"}).accepts("b")
    from_file = Tokens.from_env({"TELEMETRY_API_TOKENS_FILE": str(tmp_path / "absent"), "TELEMETRY_API_TOKENS": "a"})
    assert from_file is not None and not from_file.accepts("a")  # the file wins, and it is missing
    described = Tokens.from_env({"TELEMETRY_API_TOKENS": "sekrit1,sekrit2"}).describe()
    assert described == "2 API token(s) from $TELEMETRY_API_TOKENS"
