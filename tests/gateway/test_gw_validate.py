"""Pure checks of what the gateway refuses before routing, without sockets: the OpenAI schema
of each endpoint (validate.py), what a model serves (controller/routes.py), the cluster
pass-through's paths (api.cluster_path) and the client timeouts' deadlines."""

from __future__ import annotations

from typing import Any

import pytest

from modelfleet.controller.routes import build_route_table, model_endpoints
from modelfleet.gateway.api import cluster_path
from modelfleet.gateway.client_timeouts import BODY, HEADERS, IDLE, ClientTimeouts, next_deadline
from modelfleet.gateway.routes import keep_missing, parse_routes
from modelfleet.gateway.validate import CHAT, COMPLETIONS, EMBEDDINGS, check, wrong_endpoint
from modelfleet.models import Deployment, Instance, InstanceState
from modelfleet.store.base import ClusterMeta

USER = {"role": "user", "content": "hi"}


def chat(**extra: object) -> dict[str, object]:
    return {"model": "m", "messages": [USER], **extra}


def refused(endpoint: str, body: dict[str, object]) -> tuple[str, str]:
    bad = check(endpoint, body)
    assert bad is not None, f"{body} was accepted"
    assert bad.message
    return bad.param, bad.code


# -- the issue's cases, then the rest of the schema ------------------------------------------------
def test_the_issues_bad_requests_name_their_field() -> None:
    assert refused(CHAT, {"model": "m", "messages": "hello"}) == ("messages", "invalid_type")
    assert refused(CHAT, chat(max_tokens="16")) == ("max_tokens", "invalid_type")
    assert refused(CHAT, {"model": "m", "messages": [USER, {"role": "robot", "content": "x"}]}) == (
        "messages[1].role",
        "invalid_value",
    )
    assert refused(COMPLETIONS, {"model": "m", "prompt": {"text": "hi"}}) == ("prompt", "invalid_type")
    assert refused(CHAT, {"model": "m"}) == ("messages", "missing_required_parameter")
    assert refused(CHAT, chat(max_tokens=-5)) == ("max_tokens", "integer_below_min_value")


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "m", "messages": []}, "messages", "empty_array"),
        ({"model": "m", "messages": [1]}, "messages[0]", "invalid_type"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role", "missing_required_parameter"),
        ({"model": "m", "messages": [{"role": 3, "content": "x"}]}, "messages[0].role", "invalid_type"),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
        ({"model": "m", "messages": [{"role": "user", "content": []}]}, "messages[0].content", "empty_array"),
        ({"model": "m", "messages": [{"role": "user", "content": ["x"]}]}, "messages[0].content[0]", "invalid_type"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"text": "x"}]}]},
            "messages[0].content[0].type",
            "missing_required_parameter",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
            "messages[0].content[0].text",
            "invalid_type",
        ),
        (
            {"model": "m", "messages": [{"role": "assistant", "content": None}]},
            "messages[0].content",
            "missing_required_parameter",
        ),
        (
            {"model": "m", "messages": [{"role": "tool", "content": "42"}]},
            "messages[0].tool_call_id",
            "missing_required_parameter",
        ),
        (
            {"model": "m", "messages": [{"role": "assistant", "content": None, "tool_calls": "x"}]},
            "messages[0].tool_calls",
            "invalid_type",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "x", "name": 7}]}, "messages[0].name", "invalid_type"),
        (chat(max_tokens=0), "max_tokens", "integer_below_min_value"),
        (chat(max_tokens=1.5), "max_tokens", "invalid_type"),
        (chat(max_tokens=True), "max_tokens", "invalid_type"),
        (chat(max_completion_tokens=-1), "max_completion_tokens", "integer_below_min_value"),
        (chat(n=0), "n", "integer_below_min_value"),
        (chat(n=1000), "n", "integer_above_max_value"),
        (chat(temperature="hot"), "temperature", "invalid_type"),
        (chat(temperature=2.5), "temperature", "decimal_above_max_value"),
        (chat(top_p=-0.1), "top_p", "decimal_below_min_value"),
        (chat(presence_penalty=3), "presence_penalty", "decimal_above_max_value"),
        (chat(stream="yes"), "stream", "invalid_type"),
        (chat(stream_options=[]), "stream_options", "invalid_type"),
        (chat(stop=5), "stop", "invalid_type"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop", "array_above_max_length"),
        (chat(stop=["a", 1]), "stop[1]", "invalid_type"),
        (chat(logit_bias={"50256": 200}), "logit_bias.50256", "invalid_value"),
        (chat(logit_bias=[1]), "logit_bias", "invalid_type"),
        (chat(seed="1"), "seed", "invalid_type"),
        (chat(logprobs=1), "logprobs", "invalid_type"),
        (chat(top_logprobs=21), "top_logprobs", "integer_above_max_value"),
        (chat(tools={"type": "function"}), "tools", "invalid_type"),
        (chat(tools=[{"function": {}}]), "tools[0].type", "missing_required_parameter"),
        (chat(tool_choice=1), "tool_choice", "invalid_type"),
        (chat(response_format="json"), "response_format", "invalid_type"),
        (chat(response_format={}), "response_format.type", "missing_required_parameter"),
        (chat(user=1), "user", "invalid_type"),
    ],
)
def test_chat_schema(body: dict[str, object], param: str, code: str) -> None:
    assert refused(CHAT, body) == (param, code)


def test_valid_chat_requests_pass_with_extensions_and_nulls() -> None:
    ok = [
        chat(),
        chat(
            max_tokens=16.0,
            temperature=0,
            top_p=1,
            n=1,
            stream=True,
            stream_options={"include_usage": True},
            stop=["\n", "###"],
            seed=-3,
            logprobs=True,
            top_logprobs=2,
            logit_bias={"1": -100},
            user="u",
        ),
        chat(max_tokens=None, temperature=None, stop=None, tools=None),  # null counts as absent
        chat(top_k=40, min_p=0.05, grammar="root ::= x", chat_template_kwargs={"a": 1}),  # backends' own
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "system", "content": [{"type": "text", "text": "sys"}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this"},
                        {"type": "image_url", "image_url": {"url": "data:,"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
                {"role": "function", "name": "f", "content": None},
                {"role": "assistant", "content": "done", "name": "bot"},
            ],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "auto",
            "response_format": {"type": "json_object"},
            "parallel_tool_calls": False,
        },
    ]
    for body in ok:
        assert check(CHAT, body) is None, body


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "m"}, "prompt", "missing_required_parameter"),
        ({"model": "m", "prompt": 5}, "prompt", "invalid_type"),
        ({"model": "m", "prompt": []}, "prompt", "empty_array"),
        ({"model": "m", "prompt": ["a", 1]}, "prompt[1]", "invalid_type"),
        ({"model": "m", "prompt": [1, "a"]}, "prompt[1]", "invalid_type"),
        ({"model": "m", "prompt": [[1, 2], [3, "x"]]}, "prompt[1][1]", "invalid_type"),
        ({"model": "m", "prompt": [[1], 2]}, "prompt[1]", "invalid_type"),
        ({"model": "m", "prompt": [[]]}, "prompt[0]", "empty_array"),
        ({"model": "m", "prompt": [{"a": 1}]}, "prompt[0]", "invalid_type"),
        ({"model": "m", "prompt": "p", "max_tokens": -1}, "max_tokens", "integer_below_min_value"),
        ({"model": "m", "prompt": "p", "echo": "no"}, "echo", "invalid_type"),
        ({"model": "m", "prompt": "p", "logprobs": 6}, "logprobs", "integer_above_max_value"),
        ({"model": "m", "prompt": "p", "best_of": 21}, "best_of", "integer_above_max_value"),
        ({"model": "m", "prompt": "p", "suffix": 1}, "suffix", "invalid_type"),
    ],
)
def test_completions_schema(body: dict[str, object], param: str, code: str) -> None:
    assert refused(COMPLETIONS, body) == (param, code)


def test_valid_completions_pass() -> None:
    for prompt in ("p", "", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        assert check(COMPLETIONS, {"model": "m", "prompt": prompt, "max_tokens": 0, "echo": True}) is None


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "m"}, "input", "missing_required_parameter"),
        ({"model": "m", "input": {"text": "x"}}, "input", "invalid_type"),
        ({"model": "m", "input": []}, "input", "empty_array"),
        ({"model": "m", "input": ["a"] * 2049}, "input", "array_above_max_length"),
        ({"model": "m", "input": ["a", None]}, "input[1]", "invalid_type"),
        ({"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
        ({"model": "m", "input": "x", "encoding_format": 1}, "encoding_format", "invalid_type"),
        ({"model": "m", "input": "x", "dimensions": 0}, "dimensions", "integer_below_min_value"),
        ({"model": "m", "input": "x", "dimensions": "384"}, "dimensions", "invalid_type"),
    ],
)
def test_embeddings_schema(body: dict[str, object], param: str, code: str) -> None:
    assert refused(EMBEDDINGS, body) == (param, code)


def test_valid_embeddings_pass() -> None:
    for inp in ("x", ["a", "b"], [1, 2], [[1], [2, 3]]):
        assert check(EMBEDDINGS, {"model": "m", "input": inp, "encoding_format": "base64", "dimensions": 384}) is None


# -- what a model serves ----------------------------------------------------------------------------
def test_model_endpoints_follow_the_backend() -> None:
    assert model_endpoints("sentence-transformers", {}) == ["embeddings"]
    assert model_endpoints("llama.cpp", {}) == ["chat", "completions"]
    assert model_endpoints("llama.cpp", {"embedding": True}) == ["chat", "completions", "embeddings"]
    assert model_endpoints("transformers", {}) == ["chat", "completions"]
    assert model_endpoints("vllm", {}) == ["chat", "completions"]
    assert model_endpoints("vllm", {"runner": "pooling"}) == ["embeddings"]
    assert model_endpoints("openai", {}) is None  # an attached server: it answers for itself
    assert model_endpoints("some-plugin", {}) is None


def test_route_table_carries_endpoints_to_the_gateway() -> None:
    deps = [
        Deployment(name="chat", backend="llama.cpp"),
        Deployment(name="emb", backend="sentence-transformers"),
        Deployment(name="ext", backend="openai"),
    ]
    declared = Instance(
        id="w1/x",
        model="declared-emb",
        backend="sentence-transformers",
        worker_id="w1",
        state=InstanceState.READY,
        endpoint="http://h:1",
    )

    def payload_at(revision: int) -> dict[str, Any]:
        return build_route_table(
            revision=revision,
            store_time=0.0,
            controller_id="c",
            ttl=6.0,
            alive={"w1"},
            instances=[declared],
            deployments=deps,
            api_keys=[],
            meta=ClusterMeta(cluster_id="c-1"),
        )

    payload = payload_at(3)
    table = parse_routes(payload)
    assert table.endpoints == {
        "chat": frozenset({"chat", "completions"}),
        "emb": frozenset({"embeddings"}),
        "declared-emb": frozenset({"embeddings"}),
    }  # "ext": unknown, every endpoint
    # A controller that does not send the field: every endpoint open, as before.
    for m in payload["models"]:
        del m["endpoints"]
    assert parse_routes(payload).endpoints == {}
    # The reconnect grace keeps what a kept model serves.
    older = parse_routes(payload_at(2))
    assert keep_missing(older, parse_routes({**payload, "models": []})).endpoints["emb"] == frozenset({"embeddings"})


def test_wrong_endpoint_names_the_model() -> None:
    bad = wrong_endpoint("emb", CHAT, frozenset({EMBEDDINGS}))
    assert bad.param == "model" and bad.code == "unsupported_endpoint"
    assert "/v1/chat/completions" in bad.message and "/v1/embeddings" in bad.message


# -- the cluster pass-through's paths -------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw",
    [
        b"/v1/cluster/..%2f..%2fopenapi.json",
        b"/v1/cluster/..%2f..%2fmetrics",
        b"/v1/cluster/..%2F..%2Fmetrics",
        b"/v1/cluster/%2e%2e/%2e%2e/metrics",
        b"/v1/cluster/../../metrics",
        b"/v1/cluster/./workers",
        b"/v1/cluster/workers/.",
        b"/v1/cluster/workers/",
        b"/v1/cluster/",
        b"/v1/cluster/a//b",
        b"/v1/cluster/..%5c..%5cmetrics",
        b"/v1/cluster/a\\b",
        b"/v1/cluster/a%00b",
        b"/v1/cluster/a%0ab",
        b"/v1/cluster/%ff",
        b"/v1/%63luster/workers",
        b"/v1/cluster/instances/w1%2F..%2F..%2F..%2Fmetrics",
    ],
)
def test_cluster_paths_outside_or_ambiguous_are_refused(raw: bytes) -> None:
    assert cluster_path(raw) is None


def test_cluster_paths_that_the_console_and_cli_use_pass() -> None:
    assert cluster_path(b"/v1/cluster/workers") == "/v1/cluster/workers"
    assert cluster_path(b"/v1/cluster/instances/w1%2Fa/logs") == "/v1/cluster/instances/w1/a/logs"
    assert cluster_path(b"/v1/cluster/instances/w1/a/drain") == "/v1/cluster/instances/w1/a/drain"
    assert cluster_path(b"/v1/cluster/deployments/org%2Fsmollm2%3Aq4") == "/v1/cluster/deployments/org/smollm2:q4"
    # Encoded once more on the way out: a literal % stays a literal %.
    assert cluster_path(b"/v1/cluster/deployments/a%2525b") == "/v1/cluster/deployments/a%2525b"
    assert cluster_path(b"/v1/cluster/deployments/a%20b") == "/v1/cluster/deployments/a%20b"


# -- client timeouts ---------------------------------------------------------------------------------
def test_client_deadlines() -> None:
    t = ClientTimeouts(header_s=30, body_s=20, send_s=10)
    assert next_deadline(HEADERS, 100.0, 129.0, None, t) == (130.0, "headers")  # absolute: data does not extend it
    assert next_deadline(BODY, 100.0, 150.0, None, t) == (170.0, "body")  # silence between reads
    assert next_deadline(IDLE, 100.0, 150.0, None, t) is None  # between requests: keep-alive's business
    assert next_deadline(IDLE, 100.0, 150.0, 200.0, t) == (210.0, "send")
    assert next_deadline(HEADERS, 100.0, 100.0, 95.0, t) == (105.0, "send")  # the nearest wins
