"""The bundled SmolLM2 through the llama-cpp-python backend (llama-cpp-python's own server;
the llama.cpp backend, llama-server, is in test_runner_llama_server.py), over real HTTP with the official
openai client; then a crash (kill -9) and restart, an attached URL, and a clean stop.
One runner is shared by the module (a model load per test would blow the time budget)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import openai
import pytest
import pytest_asyncio

from modelfleet.models import InstanceSpec, InstanceState
from modelfleet.worker.modelspec import parse_model_flag
from modelfleet.worker.supervisor import Supervisor
from tests.conftest import require_modules
from tests.runners.helpers import alive, port_start, status_of, wait_for, wait_gone

require_modules("llama_cpp", hint="pip install 'modelfleet[runners]'")

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def llama(tmp_path_factory: pytest.TempPathFactory):
    sup = Supervisor(log_dir=tmp_path_factory.mktemp("llama-logs"), port_start=port_start(), startup_timeout=90,
                     backoff_initial=0.2, health_interval=0.5, stop_grace=5)
    spec = parse_model_flag(f"{MODEL}=llama-cpp-python", "w1").model_copy(
        update={"params": {"n_ctx": 1024, "n_threads": 2}})
    await sup.apply([spec])
    st = await wait_for(sup, spec.id, lambda s: s.state == InstanceState.READY, 90, "ready")
    yield sup, spec
    pid = status_of(sup, spec.id).pid  # type: ignore[union-attr]
    await sup.stop_all()
    assert status_of(sup, spec.id).state == InstanceState.STOPPED  # type: ignore[union-attr]
    assert pid is None or wait_gone(pid, 5)
    del st


def client_for(endpoint: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0, timeout=60,
                              http_client=httpx.AsyncClient(trust_env=False, timeout=60))


async def test_status_and_launch(llama) -> None:
    sup, spec = llama
    st = status_of(sup, spec.id)
    assert st is not None and st.state == InstanceState.READY and alive(st.pid)
    assert (st.model, st.backend, st.source) == (MODEL, "llama-cpp-python", MODEL)
    argv = sup.describe(spec.id)["argv"]
    assert argv[argv.index("--model_alias") + 1] == MODEL
    assert argv[argv.index("--interrupt_requests") + 1] == "false"
    assert argv[argv.index("--n_ctx") + 1] == "1024"
    # The model's load shows in the runner log.
    assert any(line.startswith("llama_model_loader: loaded meta data") for line in sup.logs(spec.id, 5000))


async def test_models(llama) -> None:
    sup, spec = llama
    models = await client_for(status_of(sup, spec.id).endpoint).models.list()  # type: ignore[union-attr]
    assert [m.id for m in models.data] == [MODEL]


async def test_chat(llama) -> None:
    sup, spec = llama
    client = client_for(status_of(sup, spec.id).endpoint)  # type: ignore[union-attr]
    r = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    assert r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 16
    assert r.model == MODEL


async def test_request_id_in_the_runner_log_whatever_its_form(llama) -> None:
    """The gateway's X-Request-ID is in the runner's line for the request. llama-cpp-python's
    own middleware answers 400 to an id that is not a UUID; our wrapper keeps it from it."""
    sup, spec = llama
    endpoint = status_of(sup, spec.id).endpoint  # type: ignore[union-attr]
    async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
        for rid in ("client-chosen:42/a", "0123456789abcdef0123456789abcdef"):
            r = await http.post(f"{endpoint}/v1/chat/completions", headers={"X-Request-ID": rid},
                                json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2})
            assert r.status_code == 200, r.text
            for _ in range(50):
                lines = sup.logs(spec.id, 10, request_id=rid)
                if lines:
                    break
                await asyncio.sleep(0.1)
            assert len(lines) == 1, lines
            assert lines[0].endswith(" ms"), lines
            assert f"modelfleet.runner.requests: request {rid}: POST /v1/chat/completions -> 200 in " in lines[0]


async def test_streaming_chat(llama) -> None:
    sup, spec = llama
    client = client_for(status_of(sup, spec.id).endpoint)  # type: ignore[union-attr]
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0,
                                                  stream=True)
    pieces, finish = [], None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces).strip()
    assert finish in ("stop", "length")


async def test_completions(llama) -> None:
    sup, spec = llama
    client = client_for(status_of(sup, spec.id).endpoint)  # type: ignore[union-attr]
    r = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert r.choices[0].text
    assert r.usage.completion_tokens <= 8


async def test_concurrent_streams_each_run_to_the_end(llama) -> None:
    """The server serves one request at a time; with interrupt_requests=false a second
    request waits instead of cutting the first stream short."""
    sup, spec = llama
    client = client_for(status_of(sup, spec.id).endpoint)  # type: ignore[union-attr]

    async def one(i: int) -> tuple[int, str | None]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count from {i} to {i + 20}."}], max_tokens=12,
            temperature=0, stream=True, stream_options={"include_usage": True})
        tokens, finish = 0, None
        async for chunk in stream:
            if chunk.choices:
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return tokens, finish

    results = await asyncio.gather(*(one(i) for i in range(3)))
    assert all(finish in ("stop", "length") for _, finish in results), results


async def test_crash_is_restarted(llama) -> None:
    sup, spec = llama
    st = status_of(sup, spec.id)
    assert st is not None and st.restarts == 0
    os.kill(st.pid, signal.SIGKILL)  # type: ignore[arg-type]
    st2 = await wait_for(sup, spec.id, lambda s: s.restarts == 1 and s.state == InstanceState.READY, 60,
                         "ready after restart")
    assert st2.pid != st.pid and not alive(st.pid)
    assert "runner killed by signal SIGKILL" in st2.last_error
    assert st2.endpoint == st.endpoint  # the port was free again: same endpoint
    r = await client_for(st2.endpoint).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert r.choices[0].message.content is not None


async def test_attach_follows_the_attached_server(llama, tmp_path: Path) -> None:
    """Backend openai: the llama.cpp runner's URL attached as an external server. Ready while
    it answers; failed, with the reason, once it is gone."""
    sup, spec = llama
    endpoint = status_of(sup, spec.id).endpoint  # type: ignore[union-attr]
    attacher = Supervisor(log_dir=tmp_path, health_interval=0.3, health_failures=2, probe_timeout=2)
    try:
        remote = InstanceSpec(id="w2/remote", model=MODEL, backend="openai", source=f"{endpoint}/v1")
        await attacher.apply([remote])
        st = await wait_for(attacher, remote.id, lambda s: s.state == InstanceState.READY, 20, "attached ready")
        assert st.endpoint == endpoint and st.pid is None
        assert attacher.held_resources()["memory"] == 0
        r = await client_for(st.endpoint).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
        assert r.choices
        await sup.apply([])  # the attached server goes away
        await wait_for(sup, spec.id, lambda s: s.state == InstanceState.STOPPED, 20, "llama stopped")
        st = await wait_for(attacher, remote.id, lambda s: s.state == InstanceState.FAILED, 20, "attached failed")
        assert st.last_error.startswith("attached server does not answer: GET ")
        assert f"{endpoint}/v1/models" in st.last_error
    finally:
        await attacher.stop_all()
