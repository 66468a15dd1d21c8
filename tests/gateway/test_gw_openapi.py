"""The gateway's OpenAPI document (gateway/openapi.py) agrees with what it enforces
(gateway/validate.py): a body the document calls invalid is refused, and the bodies the
gateway accepts are valid by it. Pure: no sockets (the live document is fuzzed by
schemathesis in tests/chaos/test_matrix.py)."""

from __future__ import annotations

from typing import Any

import pytest

from modelfleet.gateway.openapi import document, request_schema
from modelfleet.gateway.validate import CHAT, COMPLETIONS, EMBEDDINGS, ENDPOINTS, PATHS, SCHEMAS, check, schema_of
from tests.conftest import require_modules

require_modules("jsonschema", hint="installed with schemathesis, the test extra")

U = {"role": "user", "content": "hi"}
# (endpoint, body): shapes the schema knows; the gateway refuses every one.
INVALID: list[tuple[str, dict[str, Any]]] = [
    (CHAT, {"model": "m", "messages": "hello"}),
    (CHAT, {"model": "m"}),
    (CHAT, {"model": "m", "messages": []}),
    (CHAT, {"model": "m", "messages": [1]}),
    (CHAT, {"model": "m", "messages": [{"content": "x"}]}),
    (CHAT, {"model": "m", "messages": [{"role": "robot", "content": "x"}]}),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": 5}]}),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": []}]}),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": [{"text": "x"}]}]}),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x", "name": 3}]}),
    (CHAT, {"model": "m", "messages": [U], "max_tokens": "16"}),
    (CHAT, {"model": "m", "messages": [U], "max_tokens": -5}),
    (CHAT, {"model": "m", "messages": [U], "max_tokens": 0}),
    (CHAT, {"model": "m", "messages": [U], "temperature": 2.5}),
    (CHAT, {"model": "m", "messages": [U], "top_p": "x"}),
    (CHAT, {"model": "m", "messages": [U], "n": 0}),
    (CHAT, {"model": "m", "messages": [U], "stream": "yes"}),
    (CHAT, {"model": "m", "messages": [U], "stop": ["a", "b", "c", "d", "e"]}),
    (CHAT, {"model": "m", "messages": [U], "stop": [1]}),
    (CHAT, {"model": "m", "messages": [U], "logit_bias": {"1": 200}}),
    (CHAT, {"model": "m", "messages": [U], "tools": [{}]}),
    (CHAT, {"model": "m", "messages": [U], "tool_choice": 3}),
    (CHAT, {"model": "m", "messages": [U], "response_format": {"type": 1}}),
    (CHAT, {"model": "m", "messages": [U], "top_logprobs": 21}),
    (COMPLETIONS, {"model": "m", "prompt": {"text": "hi"}}),
    (COMPLETIONS, {"model": "m", "prompt": []}),
    (COMPLETIONS, {"model": "m", "prompt": ["a", 1]}),
    (COMPLETIONS, {"model": "m", "prompt": [[]]}),
    (COMPLETIONS, {"model": "m", "prompt": "x", "best_of": 21}),
    (COMPLETIONS, {"model": "m", "prompt": "x", "echo": 1}),
    (EMBEDDINGS, {"model": "m", "input": 3}),
    (EMBEDDINGS, {"model": "m", "input": ["x"] * 2049}),
    (EMBEDDINGS, {"model": "m", "input": "x", "encoding_format": "hex"}),
    (EMBEDDINGS, {"model": "m", "input": "x", "dimensions": 0}),
]
VALID: list[tuple[str, dict[str, Any]]] = [
    (CHAT, {"model": "m", "messages": [U]}),
    (CHAT, {"model": "m", "messages": [U], "max_tokens": None, "temperature": 0.5, "stream": True, "top_k": 4}),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}], "stop": "\n"}),
    (COMPLETIONS, {"model": "m", "prompt": [[1, 2], [3]], "max_tokens": 0, "logprobs": 2}),
    (COMPLETIONS, {"model": "m", "prompt": ["a", "b"], "seed": -1}),
    (EMBEDDINGS, {"model": "m", "input": [1, 2, 3], "encoding_format": "base64", "user": "u"}),
]


def validator(endpoint: str, models: tuple[str, ...] = ()) -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(request_schema(endpoint, models))


@pytest.mark.parametrize(("endpoint", "body"), INVALID)
def test_what_the_document_calls_invalid_is_refused(endpoint: str, body: dict[str, Any]) -> None:
    assert not validator(endpoint).is_valid(body), body
    assert check(endpoint, body) is not None, body


@pytest.mark.parametrize(("endpoint", "body"), VALID)
def test_what_the_gateway_accepts_is_valid_by_the_document(endpoint: str, body: dict[str, Any]) -> None:
    assert check(endpoint, body) is None
    assert validator(endpoint, ("m",)).is_valid(body)
    assert not validator(endpoint, ("other",)).is_valid(body)  # model: an enum of the served ones


def test_every_checked_field_is_in_the_document() -> None:
    import jsonschema

    doc = document({CHAT: ["m"]})
    jsonschema.Draft202012Validator.check_schema(request_schema(CHAT))
    assert doc["openapi"].startswith("3.1")
    for endpoint in ENDPOINTS:
        required, fields = SCHEMAS[endpoint]
        op = doc["paths"][PATHS[endpoint]]["post"]
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert set(schema["properties"]) == {"model", *fields}
        assert schema["required"] == ["model", required] and schema["additionalProperties"] is True
        assert {"200", "400", "401", "404", "429", "503"} <= set(op["responses"])
        for f in fields.values():
            jsonschema.Draft202012Validator.check_schema(schema_of(f))
    chat_model = doc["paths"][PATHS[CHAT]]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat_model["properties"]["model"]["enum"] == ["m"]
    embed = doc["paths"][PATHS[EMBEDDINGS]]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "enum" not in embed["properties"]["model"]  # no model serves it: any name (then 404)


def test_integers_past_64_bits_are_refused_not_rounded_onto_a_bound() -> None:
    """Found by schemathesis: orjson parses -(2**63)-1 to the float -2**63, the seed's minimum."""
    import orjson

    for raw in (b"-9223372036854775809", b"18446744073709551616", b"1e300"):
        body = orjson.loads(b'{"model": "m", "prompt": "x", "seed": %s, "max_tokens": 4}' % raw)
        assert check(COMPLETIONS, body) is not None, raw
        body = orjson.loads(b'{"model": "m", "prompt": "x", "max_tokens": %s}' % raw)
        assert raw.startswith(b"-") or check(COMPLETIONS, body) is not None, raw
    assert check(COMPLETIONS, {"model": "m", "prompt": "x", "seed": -(2**63), "max_tokens": 16.0}) is None
