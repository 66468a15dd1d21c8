"""Bad inference requests through a real gateway in front of the bundled models on real runners
(llama.cpp for chat, sentence-transformers for embeddings): each is a 400 naming the field,
never a runner's 500 (or a 200 for a request that is not one); an endpoint a model does not
serve is a 400 naming `model`; the official openai client's ordinary calls still pass.
One cluster (controller, worker, gateway) for the module: loading models is the slow part."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import free_port, require_modules
from tests.support.procs import MODELFLEET, Procs, wait_for

require_modules("llama_cpp", "sentence_transformers", hint="pip install 'modelfleet[runners]'")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
CHAT, EMB = "smollm2-135m-instruct", "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("bad-requests")
    procs = Procs(tmp)
    try:
        cport, gport = free_port(), free_port()
        ctl = f"http://127.0.0.1:{cport}"
        procs.controller("ctl", cport, f"sqlite:///{tmp / 'state.db'}", "--heartbeat-interval", "1")
        procs.worker(
            "w1", free_port(), ctl, "--heartbeat-interval", "1", "--runner-port-start", str(free_port())
        ).wait_ready(60)
        for body in (
            {
                "name": CHAT,
                "backend": "llama.cpp",
                "source": CHAT,
                "max_concurrency": 2,
                "params": {"n_ctx": 1024, "n_threads": 1},
            },
            {"name": EMB, "backend": "sentence-transformers", "source": EMB, "params": {"n_threads": 1}},
        ):
            r = httpx.post(f"{ctl}/v1/cluster/deployments", json=body, timeout=10)
            assert r.status_code == 201, r.text
        gw = f"http://127.0.0.1:{gport}"
        procs.start(
            "gateway",
            [
                *MODELFLEET,
                "gateway",
                "--controller",
                ctl,
                "--host",
                "127.0.0.1",
                "--port",
                str(gport),
                "--snapshot-path",
                str(tmp / "routes.json"),
            ],
            ready_url=f"{gw}/health/ready",
        ).wait_ready(60)

        def both_routable() -> bool:
            models = {m["id"]: m["instances"] for m in httpx.get(f"{gw}/v1/models", timeout=5).json()["data"]}
            return models.get(CHAT) == 1 and models.get(EMB) == 1

        wait_for(both_routable, 180, interval=0.5, what="both bundled models ready behind the gateway")
        yield gw
    finally:
        procs.stop_all()


def post(gw: str, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{gw}{path}", json=body, timeout=60)


def assert_400(r: httpx.Response, param: str) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], err
    assert r.headers["x-modelfleet-instance"] == "-"  # refused by the gateway, not by a runner


USER = [{"role": "user", "content": "Say hi"}]


def test_the_issues_bad_requests_are_400s(gateway: str) -> None:
    assert_400(post(gateway, "/v1/chat/completions", {"model": CHAT, "messages": "Say hi"}), "messages")
    assert_400(
        post(gateway, "/v1/chat/completions", {"model": CHAT, "messages": USER, "max_tokens": "8"}), "max_tokens"
    )
    assert_400(
        post(gateway, "/v1/chat/completions", {"model": CHAT, "messages": [*USER, {"role": "wizard", "content": "x"}]}),
        "messages[1].role",
    )
    assert_400(post(gateway, "/v1/completions", {"model": CHAT, "prompt": {"text": "Say hi"}}), "prompt")
    # These two used to be answered 200: a request without messages, and a negative max_tokens.
    assert_400(post(gateway, "/v1/chat/completions", {"model": CHAT}), "messages")
    assert_400(post(gateway, "/v1/chat/completions", {"model": CHAT, "messages": USER, "max_tokens": -3}), "max_tokens")
    assert_400(post(gateway, "/v1/embeddings", {"model": EMB, "input": {"text": "x"}}), "input")
    assert_400(
        post(gateway, "/v1/embeddings", {"model": EMB, "input": "x", "encoding_format": "int8"}), "encoding_format"
    )


def test_an_endpoint_the_model_does_not_serve_is_a_400_naming_the_model(gateway: str) -> None:
    r = post(gateway, "/v1/embeddings", {"model": CHAT, "input": "hello"})
    assert_400(r, "model")
    assert r.json()["error"]["code"] == "unsupported_endpoint" and "/v1/chat/completions" in r.text
    assert_400(post(gateway, "/v1/chat/completions", {"model": EMB, "messages": USER}), "model")
    assert_400(post(gateway, "/v1/completions", {"model": EMB, "prompt": "hello"}), "model")


def test_ordinary_embeddings_calls_still_pass(gateway: str) -> None:
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=120)
    e = client.embeddings.create(model=EMB, input=["hello", "world"])  # base64, as the client asks by default
    assert len(e.data) == 2 and len(e.data[0].embedding) == 384
    f = client.embeddings.create(model=EMB, input="hello", encoding_format="float", dimensions=384)
    assert len(f.data[0].embedding) == 384


def test_ordinary_chat_and_completions_calls_still_pass(gateway: str) -> None:
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.chat.completions.create(
        model=CHAT, messages=USER, max_tokens=8, temperature=0, top_p=0.9, stop=["\n\n"], seed=1
    )
    assert r.choices[0].message.content is not None and r.usage.completion_tokens <= 8
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=CHAT,
            messages=[{"role": "system", "content": "Be brief."}, *USER],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
        if c.choices
    ]
    assert "".join(pieces).strip()
    c = client.completions.create(model=CHAT, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert c.choices[0].text
