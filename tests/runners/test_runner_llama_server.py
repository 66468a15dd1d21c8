"""The bundled SmolLM2 on the llama.cpp backend (llama.cpp's own llama-server), over real
HTTP with the official openai client: 8 concurrent streams on one instance, the slots,
queue and prompt-cache numbers the worker scrapes, a kill -9 restarted by the Supervisor,
and the build script's cache. One runner is shared by the module."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import pytest_asyncio
from prometheus_client import generate_latest

from modelfleet.models import InstanceState
from modelfleet.worker.modelspec import parse_model_flag
from modelfleet.worker.runners.backend_llama_server import find_binary
from modelfleet.worker.slots import SlotScraper
from modelfleet.worker.supervisor import Supervisor
from tests.runners.helpers import alive, port_start, status_of, wait_for, wait_gone

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"
SLOTS = 8

if find_binary() is None and os.environ.get("CI") != "true":
    pytest.skip(
        "llama-server is not built: run scripts/build_llama_server.sh (make install does)", allow_module_level=True
    )

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

# Questions whose one-word answers the 135M model gets right, so each stream's content can be
# checked against its own question (a mixed-up stream would answer another one).
QUESTIONS = [
    ("What is the capital of France? Answer in one word.", "paris"),
    ("What is the capital of Portugal? Answer in one word.", "lisbon"),
    ("What is the capital of Italy? Answer in one word.", "rome"),
    ("What is the capital of Germany? Answer in one word.", "berlin"),
    ("What is the capital of Japan? Answer in one word.", "tokyo"),
    ("What is the capital of England? Answer in one word.", "london"),
    ("What is the capital of Spain? Answer in one word.", "madrid"),
    ("What is the capital of Russia? Answer in one word.", "moscow"),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory):
    sup = Supervisor(
        log_dir=tmp_path_factory.mktemp("llama-server-logs"),
        port_start=port_start(),
        startup_timeout=90,
        backoff_initial=0.2,
        health_interval=0.5,
        stop_grace=5,
    )
    spec = parse_model_flag(MODEL, "w1").model_copy(
        update={"max_concurrency": SLOTS, "params": {"n_ctx": 1024, "n_threads": 2}}
    )
    assert spec.backend == "llama.cpp"
    await sup.apply([spec])
    await wait_for(sup, spec.id, lambda s: s.state == InstanceState.READY, 90, "ready")
    yield sup, spec
    pid = status_of(sup, spec.id).pid  # type: ignore[union-attr]
    await sup.stop_all()
    assert status_of(sup, spec.id).state == InstanceState.STOPPED  # type: ignore[union-attr]
    assert pid is None or wait_gone(pid, 5)


def client_for(endpoint: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{endpoint}/v1",
        api_key="unused",
        max_retries=0,
        timeout=120,
        # llama-server closes idle keep-alive connections after 5 s, httpx keeps them 5 s:
        # drop them earlier, as the gateway's pool does, so no request meets a closing one.
        http_client=httpx.AsyncClient(trust_env=False, timeout=120, limits=httpx.Limits(max_keepalive_connections=0)),
    )


def endpoint_of(sup: Supervisor, iid: str) -> str:
    st = status_of(sup, iid)
    assert st is not None and st.endpoint
    return st.endpoint


async def test_runs_llama_server_with_slots(server) -> None:
    sup, spec = server
    st = status_of(sup, spec.id)
    assert st is not None and st.state == InstanceState.READY and alive(st.pid)
    assert (st.model, st.backend, st.max_concurrency) == (MODEL, "llama.cpp", SLOTS)
    argv = sup.describe(spec.id)["argv"]
    assert Path(argv[0]).name == "llama-server"
    assert argv[argv.index("--parallel") + 1] == str(SLOTS)
    assert argv[argv.index("--ctx-size") + 1] == str(1024 * SLOTS)
    models = await client_for(st.endpoint).models.list()  # type: ignore[arg-type]
    assert [m.id for m in models.data] == [MODEL]
    # The server itself says it has 8 slots of 1024 tokens each.
    async with httpx.AsyncClient(trust_env=False) as http:
        slots = (await http.get(f"{st.endpoint}/slots")).json()
    assert len(slots) == SLOTS and {s["n_ctx"] for s in slots} == {1024}


async def test_chat_and_completions(server) -> None:
    sup, spec = server
    client = client_for(endpoint_of(sup, spec.id))
    r = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTIONS[0][0]}], max_tokens=16, temperature=0
    )
    assert "paris" in r.choices[0].message.content.lower()
    assert r.choices[0].finish_reason in ("stop", "length") and r.model == MODEL
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 16
    c = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert c.choices[0].text and c.usage.completion_tokens <= 8


async def test_eight_concurrent_streams_complete_with_their_own_answers(server) -> None:
    sup, spec = server
    client = client_for(endpoint_of(sup, spec.id))
    scraper = SlotScraper()
    busiest = 0

    async def one(question: str) -> tuple[str, str | None, int]:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": question}],
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, finish, tokens = [], None, 0
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return "".join(pieces), finish, tokens

    async def watch(done: asyncio.Event) -> None:
        nonlocal busiest
        while not done.is_set():
            for r in await scraper.scrape(sup.slot_targets()):
                busiest = max(busiest, r.busy)
            await asyncio.sleep(0.05)

    done = asyncio.Event()
    watcher = asyncio.create_task(watch(done))
    try:
        results = await asyncio.gather(*(one(q) for q, _ in QUESTIONS))
    finally:
        done.set()
        await watcher
        await scraper.aclose()
    # Each stream answers its own question: the same words as that question asked alone
    # (greedy decoding; compared on the first words, which batching does not change).
    for (question, _), (text, finish, tokens) in zip(QUESTIONS, results, strict=True):
        alone, _, _ = await one(question)
        assert text.lower().split()[:3] == alone.lower().split()[:3], (question, text, alone)
        assert finish in ("stop", "length") and tokens > 0, (question, finish, tokens)
    assert "paris" in results[0][0].lower()
    # The server decoded them together: several slots were busy at once.
    assert busiest >= 2, busiest


async def test_slots_queue_and_cache_metrics_appear(server) -> None:
    """12 long streams on 8 slots: 8 run and 4 wait inside the server; the worker's scraper
    sees 8 busy slots and a queue, and exports both in the worker's Prometheus metrics. The
    same long prompt a second time comes from the prompt cache."""
    sup, spec = server
    client = client_for(endpoint_of(sup, spec.id))
    scraper = SlotScraper()
    seen_busy, seen_queue = 0, 0
    exported = ""

    async def one(i: int) -> None:
        r = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Tell a long story about the number {i}."}],
            max_tokens=96,
            temperature=0,
        )
        assert r.choices[0].finish_reason in ("stop", "length")

    tasks = [asyncio.create_task(one(i)) for i in range(12)]
    try:
        deadline = time.monotonic() + 120
        while not all(t.done() for t in tasks) and time.monotonic() < deadline:
            for r in await scraper.scrape(sup.slot_targets()):
                if r.error is not None:
                    continue  # a scrape can time out on a loaded machine; the next one counts
                seen_busy, seen_queue = max(seen_busy, r.busy), max(seen_queue, r.queue)
                if r.busy == SLOTS and r.queue > 0 and not exported:
                    exported = generate_latest().decode()
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    assert seen_busy == SLOTS and seen_queue >= 1, (seen_busy, seen_queue)
    label = f'instance="{spec.id}"'
    assert f"modelfleet_worker_runner_slots{{{label}}} 8.0" in exported
    assert f"modelfleet_worker_runner_slots_busy{{{label}}} 8.0" in exported
    assert f"modelfleet_worker_runner_queue{{{label}}} 0.0" not in exported
    assert f"modelfleet_worker_runner_queue{{{label}}}" in exported

    # Prompt cache: the same long prompt twice; the second reuses the first one's tokens.
    long_prompt = "Here is a list of fruits: " + ", ".join(["apple", "banana", "cherry", "grape"] * 40) + "."
    before = (await scraper.scrape(sup.slot_targets()))[0]
    for _ in range(2):
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": long_prompt}], max_tokens=4, temperature=0
        )
    after = (await scraper.scrape(sup.slot_targets()))[0]
    await scraper.aclose()
    assert after.prompt_tokens_cached - before.prompt_tokens_cached > 100, (before, after)
    assert after.cache_reuse is not None and after.cache_reuse > 0
    assert after.generated_tokens > before.generated_tokens
    assert f"modelfleet_worker_runner_prompt_tokens_cached{{{label}}} {float(after.prompt_tokens_cached)}" in (
        generate_latest().decode()
    )


async def test_crash_is_restarted(server) -> None:
    sup, spec = server
    st = status_of(sup, spec.id)
    assert st is not None and st.restarts == 0 and st.pid is not None
    os.kill(st.pid, signal.SIGKILL)
    st2 = await wait_for(
        sup, spec.id, lambda s: s.restarts == 1 and s.state == InstanceState.READY, 60, "ready after restart"
    )
    assert st2.pid != st.pid and not alive(st.pid)
    assert "runner killed by signal SIGKILL" in (st2.last_error or "")
    assert st2.endpoint == st.endpoint
    r = await client_for(st2.endpoint).chat.completions.create(  # type: ignore[arg-type]
        model=MODEL, messages=[{"role": "user", "content": QUESTIONS[0][0]}], max_tokens=8, temperature=0
    )
    assert "paris" in (r.choices[0].message.content or "").lower()


async def test_build_is_cached() -> None:
    """A second run of the build script (what every `make install` does) builds nothing."""
    started = time.monotonic()
    r = await asyncio.to_thread(
        subprocess.run,
        ["bash", str(ROOT / "scripts" / "build_llama_server.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    took = time.monotonic() - started
    assert r.returncode == 0, r.stdout + r.stderr
    assert "already built" in r.stdout and "nothing to do" in r.stdout, r.stdout
    assert "compiling" not in r.stdout
    assert took < 20, took
