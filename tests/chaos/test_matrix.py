"""The fast part of the failure matrix (tests/chaos/matrix.py) in `make test`: bad input
(schemathesis against the controller's, the worker's and the gateway's OpenAPI, a bounded
number of examples), auth and secrets, a poison deployment, a stalled reader. Each row's
verdict must pass; the whole matrix is `make chaos` (bench/chaos.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.matrix import fast_scenarios, run_scenario, table
from tests.conftest import require_modules

require_modules("schemathesis", hint="the test extra: pip install -e '.[test]'")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", fast_scenarios())
async def test_fast_scenario_passes(name: str, tmp_path: Path) -> None:
    result = await run_scenario(name, tmp_path)
    print("\n" + table([result]))
    assert result.ok, (result.note, result.checks)
    assert result.sent > 0
