"""Checks an inference request against the OpenAI schema of its endpoint, before routing.

Pure functions over the body already parsed by the proxy (no second parse, no models, no
copies): plain type checks, so the cost on the request path stays in microseconds. A bad
request answers 400 with the OpenAI error body naming the field (``param``, e.g.
``messages[1].role``) instead of reaching a runner, which would answer 500 or, worse, 200.

What is checked: the fields the OpenAI API defines for the endpoint, their types, required
fields, ranges and enumerations. What is not: fields OpenAI does not define (backends have
their own extensions: ``top_k``, ``min_p``, ``grammar``, ``chat_template_kwargs``…), which
pass through untouched; and what only the model can know (context length, a tokenizer's
vocabulary). ``null`` counts as absent wherever OpenAI allows it for an optional field.

Each endpoint is a table from field name to its check, and a request costs one look-up per
field it carries (a typical chat request: three or four), not one per field the API knows.

``check(endpoint, body)`` returns None when the body is fine, else an ``Invalid``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CHAT, COMPLETIONS, EMBEDDINGS = "chat", "completions", "embeddings"
ENDPOINTS = (CHAT, COMPLETIONS, EMBEDDINGS)
PATHS = {CHAT: "/v1/chat/completions", COMPLETIONS: "/v1/completions", EMBEDDINGS: "/v1/embeddings"}

ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})
MAX_STOP = 4
MAX_N = 128
MAX_EMBEDDING_INPUTS = 2048
EXACT_FLOAT_INT = 2**53


@dataclass(frozen=True, slots=True)
class Invalid:
    """Why a request is refused: the OpenAI error's message, param and code."""

    message: str
    param: str
    code: str


Check = Callable[[str, Any], "Invalid | None"]  # (param, value) -> None if fine; value is never None


def _schema(check: Check, schema: dict[str, Any]) -> Check:
    """Attach the JSON Schema of what ``check`` accepts: the gateway's OpenAPI document
    (gateway/openapi.py) is built from these, so it says what this module enforces."""
    check.schema = schema  # type: ignore[attr-defined]
    return check


def schema_of(check: Check) -> dict[str, Any]:
    return check.schema  # type: ignore[attr-defined]


# -- messages, in OpenAI's words ---------------------------------------------------------------
def _kind(v: Any) -> str:
    """The JSON name of a value's type, for messages ("expected an integer, but got a string")."""
    t = type(v)
    if t is str:
        return "a string"
    if t is bool:
        return "a boolean"
    if t is int or t is float:
        return "a number"
    if t is list:
        return "an array"
    if t is dict:
        return "an object"
    return "null" if v is None else t.__name__


def _type_error(param: str, expected: str, v: Any) -> Invalid:
    msg = f"Invalid type for '{param}': expected {expected}, but got {_kind(v)} instead."
    return Invalid(msg, param, "invalid_type")


def _missing(param: str) -> Invalid:
    return Invalid(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def _empty(param: str) -> Invalid:
    msg = f"Invalid '{param}': empty array. Expected an array with minimum length 1, but got an empty array instead."
    return Invalid(msg, param, "empty_array")


def _too_long(param: str, limit: int, n: int) -> Invalid:
    msg = (
        f"Invalid '{param}': array too long. Expected an array with maximum length {limit}, but got an array "
        f"with length {n} instead."
    )
    return Invalid(msg, param, "array_above_max_length")


def _out_of_range(param: str, v: Any, what: str, bound: str, limit: float) -> Invalid:
    side = "below minimum" if bound == ">=" else "above maximum"
    msg = f"Invalid '{param}': {what} {side} value. Expected a value {bound} {limit}, but got {v} instead."
    return Invalid(msg, param, f"{what}_{'below_min' if bound == '>=' else 'above_max'}_value")


# -- field checks ---------------------------------------------------------------------------------
def _int(lo: int, hi: int | None = None) -> Check:
    def check(param: str, v: Any) -> Invalid | None:
        t = type(v)
        # JSON has one number type: 16.0 is an integer to every OpenAI client; true is not.
        if t is not int and not (t is float and v.is_integer()):
            return _type_error(param, "an integer", v)
        # An integer past 64 bits parses to a float (orjson), whose rounding can land it on a
        # bound: -(2**63)-1 reads as -2**63. Past 2**53 a float is no exact integer: refused.
        if t is float and not -EXACT_FLOAT_INT <= v <= EXACT_FLOAT_INT:
            return _type_error(param, "an integer", v)
        if v < lo:
            return _out_of_range(param, v, "integer", ">=", lo)
        if hi is not None and v > hi:
            return _out_of_range(param, v, "integer", "<=", hi)
        return None

    return _schema(check, {"type": "integer", "minimum": lo, **({} if hi is None else {"maximum": hi})})


def _number(lo: float, hi: float) -> Check:
    def check(param: str, v: Any) -> Invalid | None:
        t = type(v)
        if t is not float and t is not int:
            return _type_error(param, "a number", v)
        if v < lo:
            return _out_of_range(param, v, "decimal", ">=", lo)
        if v > hi:
            return _out_of_range(param, v, "decimal", "<=", hi)
        return None

    return _schema(check, {"type": "number", "minimum": lo, "maximum": hi})


def _of_type(t: type, name: str, json_type: str) -> Check:
    def check(param: str, v: Any) -> Invalid | None:
        return None if type(v) is t else _type_error(param, name, v)

    return _schema(check, {"type": json_type})


_bool = _of_type(bool, "a boolean", "boolean")
_str = _of_type(str, "a string", "string")
_object = _of_type(dict, "an object", "object")


def _stop(param: str, v: Any) -> Invalid | None:
    if type(v) is str:
        return None
    if type(v) is not list:
        return _type_error(param, "a string or an array of strings", v)
    if len(v) > MAX_STOP:
        return _too_long(param, MAX_STOP, len(v))
    for i, s in enumerate(v):
        if type(s) is not str:
            return _type_error(f"{param}[{i}]", "a string", s)
    return None


def _logit_bias(param: str, v: Any) -> Invalid | None:
    if type(v) is not dict:
        return _type_error(param, "an object", v)
    for k, b in v.items():
        t = type(b)
        if t is not int and t is not float:
            return _type_error(f"{param}.{k}", "a number", b)
        if not -100 <= b <= 100:
            msg = f"Invalid '{param}.{k}': expected a value between -100 and 100, but got {b} instead."
            return Invalid(msg, f"{param}.{k}", "invalid_value")
    return None


def _typed_objects(param: str, v: Any) -> Invalid | None:
    """An array of objects that each carry a string ``type`` (tools)."""
    if type(v) is not list:
        return _type_error(param, "an array", v)
    for i, item in enumerate(v):
        p = f"{param}[{i}]"
        if type(item) is not dict:
            return _type_error(p, "an object", item)
        bad = _has_type(p, item)
        if bad:
            return bad
    return None


def _has_type(param: str, obj: dict[str, Any]) -> Invalid | None:
    kind = obj.get("type")
    if type(kind) is str:
        return None
    return _missing(f"{param}.type") if kind is None else _type_error(f"{param}.type", "a string", kind)


def _typed_object(param: str, v: Any) -> Invalid | None:
    """An object with a string ``type`` (response_format)."""
    return _type_error(param, "an object", v) if type(v) is not dict else _has_type(param, v)


def _str_or_object(param: str, v: Any) -> Invalid | None:
    return None if type(v) is str or type(v) is dict else _type_error(param, "a string or an object", v)


# The sampling fields chat and completions share.
SAMPLING: dict[str, Check] = {
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "n": _int(1, MAX_N),
    "seed": _int(-(2**63), 2**64 - 1),
    "stream": _bool,
    "stream_options": _object,
    "stop": _stop,
    "logit_bias": _logit_bias,
    "user": _str,
}


# -- chat -------------------------------------------------------------------------------------
def _parts(content: list[Any], param: str) -> Invalid | None:
    """An array of content parts: objects with a string ``type`` (text, image_url, input_audio,
    file, refusal; backends add others, so the type's value is theirs to judge)."""
    if not content:
        return _empty(param)
    bad = _typed_objects(param, content)
    if bad:
        return bad
    for j, part in enumerate(content):
        if part["type"] == "text" and type(part.get("text")) is not str:
            text = part.get("text")
            p = f"{param}[{j}].text"
            return _missing(p) if text is None else _type_error(p, "a string", text)
    return None


def _message(m: Any, i: int) -> Invalid | None:
    p = f"messages[{i}]"
    if type(m) is not dict:
        return _type_error(p, "an object", m)
    role = m.get("role")
    if type(role) is not str:
        return _missing(f"{p}.role") if role is None else _type_error(f"{p}.role", "a string", role)
    if role not in ROLES:
        msg = (
            f"Invalid value: '{role[:100]}'. Supported values are: 'system', 'assistant', 'user', 'function', "
            "'tool', and 'developer'."
        )
        return Invalid(msg, f"{p}.role", "invalid_value")
    content = m.get("content")
    tc = type(content)
    if tc is list:
        bad = _parts(content, f"{p}.content")
        if bad:
            return bad
    elif content is None:
        # Only an assistant turn that calls tools (or a function), or a function result, may be empty.
        if role == "assistant":
            if m.get("tool_calls") is None and m.get("function_call") is None:
                return _missing(f"{p}.content")
        elif role != "function":
            return _missing(f"{p}.content")
    elif tc is not str:
        return _type_error(f"{p}.content", "a string or an array of content parts", content)
    name = m.get("name")
    if name is not None and type(name) is not str:
        return _type_error(f"{p}.name", "a string", name)
    if role == "tool":
        tcid = m.get("tool_call_id")
        if type(tcid) is not str:
            return _missing(f"{p}.tool_call_id") if tcid is None else _type_error(f"{p}.tool_call_id", "a string", tcid)
    elif role == "assistant":
        calls = m.get("tool_calls")
        if calls is not None:
            if type(calls) is not list:
                return _type_error(f"{p}.tool_calls", "an array", calls)
            for j, call in enumerate(calls):
                if type(call) is not dict:
                    return _type_error(f"{p}.tool_calls[{j}]", "an object", call)
    elif role == "function" and name is None:
        return _missing(f"{p}.name")
    return None


def _messages(param: str, v: Any) -> Invalid | None:
    if type(v) is not list:
        return _type_error(param, "an array", v)
    if not v:
        return _empty(param)
    for i, m in enumerate(v):
        bad = _message(m, i)
        if bad:
            return bad
    return None


CHAT_FIELDS: dict[str, Check] = {
    **SAMPLING,
    "messages": _messages,
    "max_tokens": _int(1),
    "max_completion_tokens": _int(1),
    "logprobs": _bool,
    "top_logprobs": _int(0, 20),
    "tools": _typed_objects,
    "tool_choice": _str_or_object,
    "response_format": _typed_object,
    "parallel_tool_calls": _bool,
}


# -- completions and embeddings ------------------------------------------------------------------
def _tokens(v: list[Any], param: str) -> Invalid | None:
    if set(map(type, v)) == {int}:  # in C: an 8k-token prompt costs tens of microseconds
        return None
    j, t = next((j, t) for j, t in enumerate(v) if type(t) is not int)
    return _type_error(f"{param}[{j}]", "an integer", t)


def _text_or_tokens(param: str, v: Any, max_items: int | None = None) -> Invalid | None:
    """A string, an array of strings, an array of token ids, or an array of such arrays."""
    if type(v) is str:
        return None
    if type(v) is not list:
        return _type_error(param, PROMPT_TYPES, v)
    if not v:
        return _empty(param)
    if max_items is not None and len(v) > max_items:
        return _too_long(param, max_items, len(v))
    first = type(v[0])
    if first is str:
        if set(map(type, v)) == {str}:
            return None
        j, s = next((j, s) for j, s in enumerate(v) if type(s) is not str)
        return _type_error(f"{param}[{j}]", "a string", s)
    if first is int:
        return _tokens(v, param)
    if first is list:
        for j, row in enumerate(v):
            if type(row) is not list:
                return _type_error(f"{param}[{j}]", "an array of integers", row)
            if not row:
                return _empty(f"{param}[{j}]")
            bad = _tokens(row, f"{param}[{j}]")
            if bad:
                return bad
        return None
    return _type_error(f"{param}[0]", "a string, an integer or an array of integers", v[0])


PROMPT_TYPES = "a string, an array of strings, an array of integers or an array of arrays of integers"


def _encoding_format(param: str, v: Any) -> Invalid | None:
    if v == "float" or v == "base64":
        return None
    if type(v) is not str:
        return _type_error(param, "a string", v)
    return Invalid(f"Invalid value: '{v[:100]}'. Supported values are: 'float' and 'base64'.", param, "invalid_value")


COMPLETIONS_FIELDS: dict[str, Check] = {
    **SAMPLING,
    "prompt": _text_or_tokens,
    "max_tokens": _int(0),
    "best_of": _int(0, 20),
    "logprobs": _int(0, 5),
    "echo": _bool,
    "suffix": _str,
}

# -- the JSON Schema of each check (what the OpenAPI document publishes) ---------------------------
_STRINGS = {"type": "array", "items": {"type": "string"}}
_TOKENS = {"type": "array", "minItems": 1, "items": {"type": "integer"}}


def _prompt_schema(max_items: int | None = None) -> dict[str, Any]:
    most = {} if max_items is None else {"maxItems": max_items}
    return {
        "oneOf": [
            {"type": "string"},
            {**_STRINGS, "minItems": 1, **most},
            {**_TOKENS, **most},
            {"type": "array", "minItems": 1, **most, "items": _TOKENS},
        ]
    }


_TYPED = {"type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}}
_schema(_stop, {"oneOf": [{"type": "string"}, {**_STRINGS, "maxItems": MAX_STOP}]})
_schema(_logit_bias, {"type": "object", "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}})
_schema(_typed_objects, {"type": "array", "items": _TYPED})
_schema(_typed_object, _TYPED)
_schema(_str_or_object, {"oneOf": [{"type": "string"}, {"type": "object"}]})
_schema(_text_or_tokens, _prompt_schema())
_schema(_encoding_format, {"type": "string", "enum": ["float", "base64"]})
# Which roles need ``content`` (and ``name``, ``tool_call_id``, ``tool_calls``) is checked by
# _message; the schema gives only what holds for every role, so that a body the schema calls
# invalid is always one the gateway refuses.
_schema(
    _messages,
    {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "required": ["role"],
            "properties": {
                "role": {"type": "string", "enum": sorted(ROLES)},
                "content": {
                    "oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": _TYPED}, {"type": "null"}]
                },
                "name": {"type": ["string", "null"]},
            },
        },
    },
)

EMBEDDINGS_FIELDS: dict[str, Check] = {
    "input": _schema(lambda p, v: _text_or_tokens(p, v, MAX_EMBEDDING_INPUTS), _prompt_schema(MAX_EMBEDDING_INPUTS)),
    "encoding_format": _encoding_format,
    "dimensions": _int(1),
    "user": _str,
}

SCHEMAS: dict[str, tuple[str, dict[str, Check]]] = {  # endpoint -> (required field, field checks)
    CHAT: ("messages", CHAT_FIELDS),
    COMPLETIONS: ("prompt", COMPLETIONS_FIELDS),
    EMBEDDINGS: ("input", EMBEDDINGS_FIELDS),
}


def check(endpoint: str, body: dict[str, Any]) -> Invalid | None:
    """None if ``body`` is a valid request for ``endpoint`` (chat, completions, embeddings)."""
    required, fields = SCHEMAS[endpoint]
    if body.get(required) is None:
        return _missing(required)
    for key, value in body.items():
        f = fields.get(key)
        if f is not None and value is not None:
            bad = f(key, value)
            if bad is not None:
                return bad
    return None


def wrong_endpoint(model: str, endpoint: str, serves: frozenset[str]) -> Invalid:
    """The model is known but does not serve this endpoint (embeddings of a chat model…)."""
    where = ", ".join(PATHS[e] for e in ENDPOINTS if e in serves) or "nothing"
    msg = f"the model `{model}` does not serve {PATHS[endpoint]}; it serves {where}"
    return Invalid(msg, "model", "unsupported_endpoint")
