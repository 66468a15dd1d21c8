"""The gateway's cold-start hold and load report, on the pool alone (asyncio, no sockets)."""

from __future__ import annotations

import asyncio
import random

import pytest

from modelfleet.gateway.load_report import load_payload
from modelfleet.gateway.pool import NoInstance, Pool
from modelfleet.gateway.routes import parse_routes
from modelfleet.gateway.settings import GatewaySettings


def table(revision: int, ids: list[str], hold: bool | None = None, state: str = "ready"):
    m: dict[str, object] = {
        "name": "m",
        "instances": [{"id": i, "endpoint": f"http://h/{i}", "state": state} for i in ids],
    }
    if hold is not None:
        m["hold"] = hold
    return parse_routes({"revision": revision, "models": [m]})


def pool(**settings: object) -> Pool:
    s = GatewaySettings(**{"snapshot_path": "", "cold_start_wait_s": 5.0, **settings})  # type: ignore[arg-type]
    return Pool(s, rng=random.Random(0))


async def test_held_request_goes_to_the_first_instance_ready_and_counts_as_queued() -> None:
    p = pool()
    p.apply(table(1, []))
    held = asyncio.create_task(p.acquire(p.models["m"]))
    await asyncio.sleep(0.05)
    assert not held.done()
    report = load_payload(p, "gw#0", 1)
    assert report["models"]["m"] == {"in_flight": 0, "queued": 1}
    p.apply(table(2, ["a"]))
    inst = await asyncio.wait_for(held, 1)
    assert inst.id == "a" and inst.in_flight == 1


async def test_held_past_the_bound_is_a_503_with_retry_after() -> None:
    p = pool(cold_start_wait_s=0.2)
    p.apply(table(1, []))
    with pytest.raises(NoInstance) as err:
        await p.acquire(p.models["m"])
    assert err.value.retry_after is not None and err.value.retry_after >= 1


async def test_a_model_that_will_not_start_is_refused_at_once() -> None:
    p = pool()
    p.apply(table(1, [], hold=False))
    with pytest.raises(NoInstance) as err:
        await asyncio.wait_for(p.acquire(p.models["m"]), 1)
    assert err.value.retry_after is None


async def test_report_keeps_an_instance_that_left_the_table_with_requests_on_it() -> None:
    p = pool()
    p.apply(table(1, ["a"]))
    inst = await p.acquire(p.models["m"])
    p.apply(table(2, []))  # a stream still runs on it
    assert load_payload(p, "gw#0", 2)["instances"] == {"a": {"in_flight": 1, "enabled": False}}
    p.release(inst)
    assert load_payload(p, "gw#0", 2)["instances"] == {}
