"""The fast part of the failure matrix (tests/chaos/matrix.py) in `make test`: bad input
(schemathesis against the controller's, the worker's and the gateway's OpenAPI, a bounded
number of examples), auth and secrets, a poison deployment, a stalled reader. Each row's
verdict must pass; the whole matrix is `make chaos` (bench/chaos.py)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.chaos import matrix
from tests.chaos.matrix import Result, fast_scenarios, run_scenario, scan_for_secrets, table
from tests.conftest import require_modules

require_modules("schemathesis", hint="the test extra: pip install -e '.[test]'")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", fast_scenarios())
async def test_fast_scenario_passes(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `make chaos` adds the random fuzzing phase, 25 examples per operation.
    monkeypatch.setattr(matrix, "SCHEMATHESIS_PHASES", "coverage")
    result = await run_scenario(name, tmp_path)
    print("\n" + table([result]))
    assert result.ok, (result.note, result.checks)
    assert result.sent > 0


def test_the_secret_scan_finds_a_secret_in_a_body_or_a_header() -> None:
    def resp(method: str, path: str, status: int, text: str = "", headers: dict[str, str] | None = None):
        return httpx.Response(status, text=text, headers=headers, request=httpx.Request(method, f"http://h{path}"))

    secrets = {"admin token": "adm-1", "API key": "sk-2"}
    clean = resp("GET", "/v1/cluster/keys", 200, '{"data": [{"id": "k1", "hash": "ab"}]}')
    assert scan_for_secrets([clean], secrets) == []
    leaks = scan_for_secrets(
        [
            clean,
            resp("GET", "/v1/gateway/status", 200, '{"admin_token": "adm-1"}'),
            resp("GET", "/metrics", 401, "no", {"x-debug": "sk-2"}),
            resp("POST", "/v1/cluster/keys", 201, '{"key": "sk-2"}'),  # the key's own creation: shown once
        ],
        secrets,
    )
    assert leaks == ["admin token in GET /v1/gateway/status (200)", "API key in GET /metrics (401)"]


def test_a_row_fails_on_any_failed_request_or_expectation() -> None:
    assert Result("s", "l", sent=10).finish().ok
    assert not Result("s", "l", sent=10, failed=1).finish().ok
    r = Result("s", "l", sent=10)
    r.expect(False, "the gateway still serves")
    assert not r.finish().ok and r.checks == ["the gateway still serves"] and "**FAIL**" in table([r])
